"""Console entry point ``raytp``: small operator commands.

  raytp tiny-model [--preset NAME]   generate (once) and print a built-in random-weight checkpoint's path
  raytp build-ops                    compile DeepSpeed's CPU shared-memory all-reduce op (and raytp's CPU bf16
                                     linear, where the CPU runs it) ahead of time
  raytp bench [...]                  benchmark OpenAI-compatible endpoints (raytp bench --help)
"""

from __future__ import annotations

import argparse
import os
import sys


def _tiny_model(args) -> int:
    from raytp import tiny_model

    print(tiny_model.ensure(args.preset))
    return 0


def _build_ops(_args) -> int:
    # The first gang start would otherwise spend 30-60 s compiling this op inside the workers.
    from raytp.platforms import torch_extensions_dir

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()  # where the ranks will look for it
    from deepspeed.accelerator import get_accelerator

    from raytp.gang import cpu_linear
    from raytp.gang.attention import cpu_decode

    if cpu_linear.unsupported_reason() is None:
        print(f"built {cpu_linear.build()}")
    if cpu_decode.native_available():
        print(f"built {cpu_decode.build()}")
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("no shared-memory all-reduce op for this accelerator; nothing to build")
        return 0
    builder.load()
    print(f"built {builder.absolute_name()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from raytp import tiny_model

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: many flags, mirrored from `vllm bench serve`
        from raytp.bench.main import main as bench_main

        return bench_main(argv[1:])

    parser = argparse.ArgumentParser(prog="raytp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tiny-model", help="generate a built-in random-weight checkpoint and print its path")
    p.add_argument("--preset", default="raytp-tiny-llama", choices=sorted(tiny_model.PRESETS))
    p.set_defaults(func=_tiny_model)
    p = sub.add_parser("build-ops", help="compile DeepSpeed's CPU shm all-reduce op and raytp's "
                                            "CPU linear now")
    p.set_defaults(func=_build_ops)
    sub.add_parser("bench", help="benchmark OpenAI-compatible endpoints (see raytp bench --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
