# Where KIVI's step goes on Llama-2-7B's MHA shape at 32k (the unmet rows of #17: KIVI-2 1.56x / 1.82x at batch
# 1 / 4, KIVI-4 1.55x at batch 4; dense at batch 1 beside them), profiled kernel by kernel with
# `profile_step.py` (its layer-scope compile, the engine's, first run on a GPU here); then the two quantized
# batch-max rows session 61 had no time for (`batch_max_rest.sh`). ~9 minutes.
source benchmarks/calls/lib.sh
gpu_info
dir=$(tree_dir HEAD)
timeout 330 bash -c "cd $dir && PYTHONPATH=$dir python benchmarks/profile_step.py --shape llama-2-7b --top 30 \
  --commit $HEAD_LABEL --out $OUT/profile_step_h100_${HEAD_LABEL}_kivi_mha.jsonl \
  --runs kivi:2:32768:1 kivi:2:32768:4 kivi:4:32768:4 full:0:32768:1 2>&1 | tee $OUT/profile_step_h100_${HEAD_LABEL}_kivi_mha.log | grep -v '^ ' | tail -n 30"
timeout 230 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_batch_max_8b.jsonl --row-time-limit-s 90 \
  --time-limit-s 170 --runs llama-3.1-8b:zipcache:0:32768:max llama-3.1-8b:kivi:4:8192:max"
