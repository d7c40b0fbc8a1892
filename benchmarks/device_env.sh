# Source on a device (GPU) machine, from the repository root, with .devbundle and .whl carried:
#   Ray from the device bundle, the gRPC wheels the image lacks, and the dsv4 package itself (its subpackages
#   live in top-level folders, so a namespace directory of symlinks stands in for `pip install -e .`).
source .devbundle/activate
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/dsv4pkg/dsv4
for d in model kernels cache workers cluster protos wire; do ln -sfn "$PWD/$d" "/tmp/dsv4pkg/dsv4/$d"; done
export PYTHONPATH=/tmp/dsv4pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
