"""The ``advtrain`` command: the LightningCLI subcommands (``fit``, ``validate``, ``test``: ``advtrain.cli``) and the
commands around them (``report``, ``sweep``, ``transfer``, ``covariance``)."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> int:
    """The console script: exit code 0 on success (``sys.exit(main())``), 2 on a user's mistake."""
    argv = sys.argv[1:] if args is None else args
    command = list(argv[:1]) if isinstance(argv, (list, tuple)) else []
    if command == ["report"]:
        from advtrain import report

        report.main(list(argv[1:]))
        return 0
    if command == ["sweep"]:
        from advtrain import sweep

        return sweep.main(list(argv[1:]))
    from advtrain.cli import quiet_lightning_noise, run

    if command in (["transfer"], ["covariance"]):
        from advtrain import covariance, transfer

        quiet_lightning_noise()
        (transfer if command == ["transfer"] else covariance).main(list(argv[1:]))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
