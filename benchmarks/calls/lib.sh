# Helpers for the device calls in this folder (sourced on the GPU machine, in the copy's root).
# Prepared here before a call:
#   mkdir -p .gpu && grep -qx /.gpu/ .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#   git rev-parse --short HEAD > .gpu/head.txt                       # the label of the copy's rows
#   git archive --format=tar.gz -o .gpu/tree_<sha>.tgz <sha>          # each older tree a call compares against
# and the call carries .gpu: run(command="bash benchmarks/calls/<script>.sh", carry=[".gpu"]).
set -u
export PYTHONUNBUFFERED=1
HEAD_LABEL=$(cat .gpu/head.txt)

tree_dir() {  # tree_dir SHA -> a directory holding that commit's tree (HEAD: the copy), laid out as installed:
  # `methods/` and `tasks/` inside `kvbench/` (pyproject maps them so; PYTHONPATH alone does not)
  local sha=$1 dir=/tmp/tree_$1
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    if [ "$sha" = HEAD ]; then cp -r kvbench methods tasks benchmarks configs "$dir"
    else tar -xzf ".gpu/tree_$sha.tgz" -C "$dir"; fi
    cp -r "$dir/methods" "$dir/kvbench/methods" && cp -r "$dir/tasks" "$dir/kvbench/tasks"
  fi
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
