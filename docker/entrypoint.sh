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

# sift writes relative paths into the working directory (the shipped configs' runs/ and data/, sift
# launch's .deepspeed_env and hostfile): refuse now, in one line, rather than with a PermissionError
# after minutes of start-up. The image's working directory is writable by its user (uid 1000); this
# catches another --user, or a -w on a read-only mount.
need_writable_cwd() {
  local arg
  for arg in "$@"; do
    if [[ "${arg}" == "-h" || "${arg}" == "--help" ]]; then return 0; fi
  done
  if [[ -w . ]]; then return 0; fi
  echo "sift-entrypoint: the working directory ${PWD} is not writable by uid $(id -u), and sift writes run" \
       "outputs, datasets and launch files relative to it. Run as the image's user (uid 1000, to which" \
       "/opt/sift-train is writable), or give a writable working directory on a mounted volume" \
       "(docker run -v /fsx:/fsx -w /fsx/...)." >&2
  exit 2
}

# The sift subcommands (launcher/cli.py SUBCOMMANDS); anything else is a program to run.
case "${1:-}" in
  "" | -h | --help | help) exec sift --help ;;
  prepare | train | reference | export | convert-checkpoint | launch | demo | bench | study) need_writable_cwd "$@"; exec sift "$@" ;;
  *) exec "$@" ;;
esac
