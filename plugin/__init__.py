"""The dock page, served by the engine at /dock (static files; this file only makes the folder package data)."""
