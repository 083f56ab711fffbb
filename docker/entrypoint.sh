#!/usr/bin/env bash
# Entry point of the SIFT-Train image.
#   docker run IMAGE launch --backend mpirun ...   -> sift launch --backend mpirun ...
#   docker run IMAGE bash | mpirun ... | deepspeed ... | all_reduce_perf ...   -> run as given
set -euo pipefail

# Say early what would otherwise show up later as slow NCCL over TCP or an EFA memory error.
if [[ "${SIFT_SKIP_CHECKS:-0}" != "1" ]]; then
  if ! compgen -G "/dev/infiniband/uverbs*" > /dev/null; then
    echo "sift-entrypoint: no EFA device in the container (/dev/infiniband/uverbs*): NCCL will use TCP." \
         "On p4d pass --device=/dev/infiniband/uverbs0 ... uverbs3 (docker/README.md)." >&2
  fi
  if [[ "$(ulimit -l)" != "unlimited" ]]; then
    echo "sift-entrypoint: locked-memory limit is $(ulimit -l) KiB; EFA needs --ulimit memlock=-1." >&2
  fi
fi

# The sift subcommands (launcher/cli.py SUBCOMMANDS); anything else is a program to run.
case "${1:-}" in
  "" | -h | --help | help) exec sift --help ;;
  prepare | train | export | launch | demo | bench | study) exec sift "$@" ;;
  *) exec "$@" ;;
esac
