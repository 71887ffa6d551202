# live2diff-engine installer for Windows: a thin wrapper. What it does, and nothing else:
#   1. finds a 64-bit Python 3.12, 3.11 or 3.10 (py launcher, python on PATH, winget's folder; py -3.X can be 32-bit);
#   2. if there is none, asks, then installs Python 3.11 for this user with winget (no admin) and reads PATH again;
#   3. has installer.py check that Python and the path length (--preflight), then creates the venv PREFIX\venv
#      (default %LOCALAPPDATA%\live2diff-engine\venv) unless it is there;
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
$Prefix = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($Prefix)
$Repo = (Resolve-Path "$PSScriptRoot\..\..").Path
$Installer = Join-Path $Repo 'live2diff_engine\installer.py'
# Prints the interpreter when it is 3.10-3.12 and 64-bit (torch has no 32-bit wheels). No double quotes inside:
# Windows PowerShell 5.1 hands them to python.exe unescaped.
$Check = 'import sys; ok = (3,10) <= sys.version_info[:2] <= (3,12) and sys.maxsize > 2**32; ok and print(sys.executable); sys.exit(not ok)'
function Fail($msg) { Write-Host "install.ps1: error: $msg" -ForegroundColor Red; exit 1 }
function Find-Python {
    if (Get-Command py -ErrorAction SilentlyContinue) {
        foreach ($v in '3.12', '3.11', '3.10') { foreach ($tag in "-$v-64", "-$v") {
            $exe = & py $tag -c $Check 2>$null
            if ($LASTEXITCODE -eq 0 -and $exe) { return "$exe".Trim() }
        } }
    }
    $found = @(Get-Command python -All -ErrorAction SilentlyContinue | ForEach-Object { $_.Source })
    foreach ($c in $found + "$env:LOCALAPPDATA\Programs\Python\Python311\python.exe") {
        if ($c -and $c -notlike '*WindowsApps*' -and (Test-Path $c)) {
            $exe = & $c -c $Check 2>$null
            if ($LASTEXITCODE -eq 0 -and $exe) { return "$exe".Trim() }
        }
    }
    return $null
}
if (-not (Test-Path $Installer)) { Fail "$Installer not found; unpack the whole live2diff-engine folder and run this again" }
$Python = Find-Python
if (-not $Python) {
    $Get = 'Install the 64-bit Python 3.11 from https://www.python.org/downloads/windows/ (tick "Add to PATH"), then run this again'
    if (-not (Get-Command winget -ErrorAction SilentlyContinue)) { Fail "no 64-bit Python 3.10-3.12 found. $Get" }
    $a = Read-Host 'No 64-bit Python 3.10-3.12 found. Install Python 3.11 for this user with winget now? [y/N]'
    if ($a -notmatch '^(y|yes)$') { Fail "Python is needed. $Get" }
    winget install -e --id Python.Python.3.11 --scope user --accept-package-agreements --accept-source-agreements
    # This window's PATH predates the install: read it again from the registry (Find-Python also looks in winget's folder).
    $env:Path = [Environment]::GetEnvironmentVariable('Path', 'Machine') + ';' + [Environment]::GetEnvironmentVariable('Path', 'User')
    $Python = Find-Python
    if (-not $Python) { Fail 'Python was installed but not found yet; close this window, open a new one and run this again' }
}
$Venv = Join-Path $Prefix 'venv'
$Common = @('--prefix', $Prefix, '--venv', $Venv, '--repo', $Repo)
if ($Uninstall) { & $Python $Installer @Common --uninstall @Rest; exit $LASTEXITCODE }
& $Python $Installer @Common --preflight
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
$VenvPy = Join-Path $Venv 'Scripts\python.exe'
if (-not (Test-Path $VenvPy)) {
    Write-Host "Creating the virtual environment $Venv"
    & $Python -m venv $Venv
    if ($LASTEXITCODE -ne 0) { Fail "could not create $Venv; check you can write there or pass -Prefix DIR" }
}
& $VenvPy $Installer @Common @Rest
exit $LASTEXITCODE
