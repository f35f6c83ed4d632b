# Helpers for the device calls in this folder (sourced on the GPU machine, in the copy's root).
# Prepared here before a call:
#   mkdir -p .gpu && grep -qx /.gpu/ .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#   git rev-parse --short HEAD > .gpu/head.txt                       # the label of the copy's rows
#   git archive --format=tar.gz -o .gpu/tree_<sha>.tgz <sha>          # each older tree a call compares against
# and the call carries .gpu: run(command="bash benchmarks/calls/<script>.sh", carry=[".gpu"]).
set -u
export PYTHONUNBUFFERED=1
HEAD_LABEL=$(cat .gpu/head.txt)

tree_dir() {  # tree_dir SHA -> a directory holding that commit's tree (HEAD: the copy itself)
  local sha=$1
  if [ "$sha" = HEAD ]; then echo "$PWD"; return; fi
  local dir=/tmp/tree_$sha
  [ -d "$dir" ] || { mkdir -p "$dir" && tar -xzf ".gpu/tree_$sha.tgz" -C "$dir"; }
  echo "$dir"
}

speed() {  # speed SHA LABEL OUTFILE speed.py-args...: rows to $OUT/OUTFILE, the log beside it
  local dir label=$2 out=$3
  dir=$(tree_dir "$1"); shift 3
  (cd "$dir" && PYTHONPATH="$dir" python benchmarks/speed.py --commit "$label" --out "$OUT/$out" "$@") 2>&1 \
    | tee -a "$OUT/$out.log" | tail -n 40
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
  python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
}
