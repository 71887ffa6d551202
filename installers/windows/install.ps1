# live2diff-engine installer for Windows: a thin wrapper. What it does, and nothing else:
#   1. finds Python 3.12, 3.11 or 3.10 with the py launcher (or python on PATH);
#   2. if there is none, asks, then installs Python 3.11 for this user with winget (no admin);
#   3. creates the venv PREFIX\venv (default %LOCALAPPDATA%\live2diff-engine\venv) unless it is there;
#   4. hands over to live2diff_engine\installer.py with all other arguments (--uninstall runs it with the
#      outer Python, because it deletes the venv).
# Usage: install.ps1 [-Prefix DIR | --prefix DIR] [any installer option: --cpu --no-models --no-obs --yes --uninstall ...]
# No param() block: options like --cpu must pass through untouched, so $args is read by hand.
$Prefix = "$env:LOCALAPPDATA\live2diff-engine"; $Uninstall = $false; $Rest = @()
for ($i = 0; $i -lt $args.Count; $i++) {
    if ($args[$i] -in '-Prefix', '--prefix') { $i++; $Prefix = $args[$i] }
    elseif ($args[$i] -eq '--uninstall') { $Uninstall = $true }
    else { $Rest += $args[$i] }
}
$Repo = (Resolve-Path "$PSScriptRoot\..\..").Path
$Installer = Join-Path $Repo 'live2diff_engine\installer.py'
$Check = 'import sys; sys.exit(0 if (3,10) <= sys.version_info[:2] <= (3,12) else 1)'
function Fail($msg) { Write-Host "install.ps1: error: $msg" -ForegroundColor Red; exit 1 }
function Find-Python {
    foreach ($v in '3.12', '3.11', '3.10') {
        if (Get-Command py -ErrorAction SilentlyContinue) {
            $exe = & py "-$v" -c 'import sys; print(sys.executable)' 2>$null
            if ($LASTEXITCODE -eq 0 -and $exe) { return $exe.Trim() }
        }
    }
    $p = Get-Command python -ErrorAction SilentlyContinue
    if ($p -and $p.Source -notlike '*WindowsApps*') { & $p.Source -c $Check; if ($LASTEXITCODE -eq 0) { return $p.Source } }
    return $null
}
if (-not (Test-Path $Installer)) { Fail "$Installer not found; unpack the whole live2diff-engine folder and run this again" }
$Python = Find-Python
if (-not $Python) {
    if (-not (Get-Command winget -ErrorAction SilentlyContinue)) { Fail 'no Python 3.10-3.12 found. Install Python 3.11 from https://www.python.org/downloads/windows/ (tick "Add to PATH"), then run this again' }
    $a = Read-Host 'No Python 3.10-3.12 found. Install Python 3.11 for this user with winget now? [y/N]'
    if ($a -notmatch '^(y|yes)$') { Fail 'Python is needed. Install Python 3.11 from https://www.python.org/downloads/windows/, then run this again' }
    winget install -e --id Python.Python.3.11 --scope user --accept-package-agreements --accept-source-agreements
    $Python = Find-Python
    if (-not $Python) { Fail 'Python was installed but not found yet; close this window, open a new one and run this again' }
}
New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
$Prefix = (Resolve-Path $Prefix).Path
$Venv = Join-Path $Prefix 'venv'
$Common = @('--prefix', $Prefix, '--venv', $Venv, '--repo', $Repo)
if ($Uninstall) { & $Python $Installer @Common --uninstall @Rest; exit $LASTEXITCODE }
$VenvPy = Join-Path $Venv 'Scripts\python.exe'
if (-not (Test-Path $VenvPy)) {
    Write-Host "Creating the virtual environment $Venv"
    & $Python -m venv $Venv
    if ($LASTEXITCODE -ne 0) { Fail "could not create $Venv; check you can write there or pass -Prefix DIR" }
}
& $VenvPy $Installer @Common @Rest
exit $LASTEXITCODE
