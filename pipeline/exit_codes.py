"""The exit codes of every gemlabel command (README, "Exit codes")."""

EXIT_OK = 0  # done; for `run`: complete, bad samples within the error budget included
EXIT_FAILED = 1  # failed or left unfinished: nothing could be labeled, lock lost, stalled
EXIT_USAGE = 2  # usage or configuration error: nothing was done
EXIT_ERROR_BUDGET = 3  # `run` stopped by the error budget (rows written so far are valid)
EXIT_INTERRUPTED = 130  # Ctrl-C
