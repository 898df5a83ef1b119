"""`stride` entry point: dispatches to the subcommands that live with their package.

`stride serve ...` -> service.cli, `stride offline ...` -> offline.cli (`python -m stride_diffusion.cli` is the
same command). The dispatch is by name so
that neither package imports the other.
"""
import importlib
import sys

COMMANDS = {"serve": "stride_diffusion.service.cli", "offline": "stride_diffusion.offline.cli"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: stride {serve|offline} ...\n  stride serve --help\n  stride offline --help", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
