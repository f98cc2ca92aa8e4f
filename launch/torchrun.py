"""torchrun that ends a failed job with one line instead of its report.

    python -m sparsetron.launch.torchrun [torchrun options] -m sparsetron.launch.cli train RECIPE ...

Takes torchrun's own options (it runs `torch.distributed.run`); launch/torchrun.sh and
launch/slurm_node.sh start the ranks through it. The ranks leave their errors to it (see
launch/failures.py). When ranks fail (after the restarts of --max-restarts), it prints one
`error:` line, that of the rank that failed first, and exits with that rank's status (a rank
killed by a signal: 128 + its number); stopped by a signal itself (Ctrl-C, SIGTERM), it stops
the ranks with that signal, as torchrun does (they save first), and exits with 128 + its number.
torchrun's own log lines stay.
"""

from __future__ import annotations

import os
import sys

from sparsetron.launch.failures import LAUNCHER_VAR, summarize


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHER_VAR] = "1"  # the ranks inherit it
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        line, status = summarize(err.failures)
        print(line, file=sys.stderr)
        return status
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
