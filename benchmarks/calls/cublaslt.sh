# cuBLASLt for the decode step's products (never timed): the products alone at 1 and 4 rows through cuBLAS and
# cuBLASLt (`decode_parts.py --parts matmul`), then steps with each (`TORCH_BLAS_PREFER_CUBLASLT=1` for a whole
# run; rows record `environment.blas_library`): dense at 32k batch 1 on both shapes, and Llama-2-7B's KIVI rows
# that miss 1.5x by a few percent (KIVI-2 batch 1 1.56x, KIVI-4 batch 4 1.55x, b9722f2), where the products
# are 5.4 of ~8.4 ms against a 4.4 ms weight floor. ~9 minutes.
source benchmarks/calls/lib.sh
gpu_info
dir=$(tree_dir HEAD)
timeout 100 bash -c "cd $dir && PYTHONPATH=$dir python benchmarks/decode_parts.py --parts matmul --commit $HEAD_LABEL \
  --out $OUT/decode_parts_h100_${HEAD_LABEL}_cublaslt.jsonl 2>&1 | tee $OUT/decode_parts_h100_${HEAD_LABEL}_cublaslt.log | grep -v '^{'"
ROWS="llama-3.1-8b:full:0:32768:1 llama-2-7b:full:0:32768:1 llama-2-7b:kivi:2:32768:1 llama-2-7b:kivi:4:32768:4"
timeout 230 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_cublas.jsonl --row-time-limit-s 100 \
  --time-limit-s 210 --runs $ROWS"
timeout 230 bash -c "export TORCH_BLAS_PREFER_CUBLASLT=1; source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL \
  speed_cublaslt.jsonl --row-time-limit-s 100 --time-limit-s 210 --runs $ROWS"
