@echo off
rem live2diff-engine installer: double-click me. Runs install.ps1 next to this file with any arguments;
rem the window stays open so you can read the result.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0install.ps1" %*
set rc=%errorlevel%
if not "%rc%"=="0" echo Installation failed (exit %rc%): read the message above, fix it and run install.bat again.
pause
exit /b %rc%
