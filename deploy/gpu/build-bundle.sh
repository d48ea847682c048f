#!/usr/bin/env bash
# Builds a self-contained bundle of DslaMesh apps for a GPU host that has PyTorch (CUDA) but no .NET:
#   the published apps (framework-dependent, TorchSharp's managed DLL + libLibTorchSharp.so, no LibTorch) and the
#   .NET shared runtime they need, packed as <out>/<name>.tar.xz (must stay under 60 MiB).
#
# usage: deploy/gpu/build-bundle.sh [-o OUT_DIR] [-n NAME] [-c CONFIGURATION] [PROJECT_DIR ...]
#   OUT_DIR        where the .tar.xz goes (default: <repo>/.device, which git ignores)
#   NAME           bundle and top folder name (default: dslamesh-gpu)
#   PROJECT_DIR    projects to publish, relative to the repo root (default: services/DslaMesh.Cli)
#
# On the GPU host:  tar -xJf dslamesh-gpu.tar.xz && dslamesh-gpu/run.sh bench engine --json engine.json
# run.sh runs dslactl; bin/<assembly> runs any other published app. See deploy/gpu/README.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$root/.device"
name="dslamesh-gpu"
configuration="Release"
limit_mib=60
while getopts "o:n:c:h" opt; do
  case "$opt" in
    o) out="$OPTARG" ;;
    n) name="$OPTARG" ;;
    c) configuration="$OPTARG" ;;
    h) sed -n '2,13p' "$0"; exit 0 ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
projects=("$@")
if [ ${#projects[@]} -eq 0 ]; then
  projects=(services/DslaMesh.Cli)
fi

dotnet_root="${DOTNET_ROOT:-$(dirname "$(readlink -f "$(command -v dotnet)")")}"
[ -x "$dotnet_root/dotnet" ] || { echo "error: no .NET install at '$dotnet_root' (set DOTNET_ROOT)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/dslamesh-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/$name"
mkdir -p "$stage/app" "$stage/bin" "$stage/dotnet"

frameworks=()
main_app=""
for project in "${projects[@]}"; do
  assembly="$(cd "$root" && dotnet msbuild "$project" -getProperty:AssemblyName -p:DslaTorchBackend=external)"
  echo "publishing $project ($assembly)" >&2
  # A separate artifacts path keeps this restore (no TorchSharp-cpu) away from the developer's bin/ and obj/.
  (cd "$root" && dotnet publish "$project" -c "$configuration" -r linux-x64 --self-contained false \
      -p:DslaTorchBackend=external -p:UseAppHost=false -p:PublishDocumentationFiles=false \
      -p:PublishReferencesDocumentationFiles=false -p:DebugType=none \
      --artifacts-path "$work/artifacts" -o "$stage/app/$assembly" -v q -nologo) >&2
  config="$stage/app/$assembly/$assembly.runtimeconfig.json"
  [ -f "$config" ] || { echo "error: $project published no $assembly.runtimeconfig.json" >&2; exit 1; }
  while read -r fw; do frameworks+=("$fw"); done < <(python3 -c '
import json, sys
rc = json.load(open(sys.argv[1]))["runtimeOptions"]
for fw in rc.get("frameworks", [rc.get("framework")] if rc.get("framework") else []):
    print(fw["name"], fw["version"])' "$config")
  if find "$stage/app/$assembly" -name 'libtorch_cpu.so' | grep -q .; then
    echo "error: $project published a LibTorch (DslaTorchBackend=external was not honoured)" >&2; exit 1
  fi
  cat > "$stage/bin/$assembly" <<EOF
#!/bin/sh
# Runs $assembly with the .NET runtime shipped in this bundle.
here="\$(cd "\$(dirname "\$0")/.." && pwd)"
export DOTNET_ROOT="\$here/dotnet" DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
exec "\$here/dotnet/dotnet" "\$here/app/$assembly/$assembly.dll" "\$@"
EOF
  chmod +x "$stage/bin/$assembly"
  [ -n "$main_app" ] || main_app="$assembly"
done

# The .NET host (muxer + hostfxr) and each shared framework the apps name, at the newest installed patch.
cp "$dotnet_root/dotnet" "$stage/dotnet/"
cp "$dotnet_root/LICENSE.txt" "$dotnet_root/ThirdPartyNotices.txt" "$stage/dotnet/" 2>/dev/null || true
newest() { ls -1 "$1" | grep -E "^$2\." | sort -V | tail -1; }
fxr="$(newest "$dotnet_root/host/fxr" "$(echo "${frameworks[0]#* }" | cut -d. -f1)")"
mkdir -p "$stage/dotnet/host/fxr"
cp -r "$dotnet_root/host/fxr/$fxr" "$stage/dotnet/host/fxr/"
for fw in $(printf '%s\n' "${frameworks[@]}" | sort -u | tr ' ' '@'); do
  fw_name="${fw%@*}"; fw_version="${fw#*@}"
  installed="$(newest "$dotnet_root/shared/$fw_name" "$(echo "$fw_version" | cut -d. -f1-2)")"
  [ -n "$installed" ] || { echo "error: $fw_name $fw_version is not installed under $dotnet_root" >&2; exit 1; }
  echo "runtime: $fw_name $installed" >&2
  mkdir -p "$stage/dotnet/shared/$fw_name"
  cp -r "$dotnet_root/shared/$fw_name/$installed" "$stage/dotnet/shared/$fw_name/"
done
# Not needed to run: debugger and dump support, LTTng tracing, symbols.
find "$stage/dotnet/shared" \( -name 'libmscordbi.so' -o -name 'libmscordaccore.so' -o -name 'createdump' \
  -o -name 'libcoreclrtraceptprovider.so' -o -name '*.dbg' -o -name '*.pdb' \) -delete

cat > "$stage/run.sh" <<EOF
#!/bin/sh
# Runs $main_app from this bundle: no .NET install needed. LibTorch comes from the host's PyTorch
# (python3 -c 'import torch'), or from --libtorch DIR / TorchBackend__LibTorchDirectory.
exec "\$(cd "\$(dirname "\$0")" && pwd)/bin/$main_app" "\$@"
EOF
chmod +x "$stage/run.sh"
cp "$root/deploy/gpu/bench_transformers.py" "$root/deploy/gpu/compare.py" "$root/deploy/gpu/verify-and-bench.sh" "$stage/"
cp "$root/deploy/gpu/README.md" "$stage/" 2>/dev/null || true
git -C "$root" rev-parse HEAD > "$stage/VERSION" 2>/dev/null || echo unknown > "$stage/VERSION"

mkdir -p "$out" && out="$(cd "$out" && pwd)"   # the packing below runs from another folder
archive="$out/$name.tar.xz"
(cd "$work" && tar -cf - "$name" | xz -9e -T2 > "$archive.tmp")
mv "$archive.tmp" "$archive"
size=$(stat -c %s "$archive")
echo "$archive: $(du -sh "$stage" | cut -f1) unpacked, $((size / 1024 / 1024)) MiB packed" >&2
if [ "$size" -ge $((limit_mib * 1024 * 1024)) ]; then
  echo "error: the bundle is over $limit_mib MiB" >&2
  exit 1
fi
echo "$archive"
