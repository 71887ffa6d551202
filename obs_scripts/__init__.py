"""The OBS script, loaded by OBS from this folder (Tools > Scripts); this file only makes it package data."""
