"""The exit codes of every `ditsweep` command, declared once."""

EXIT_OK = 0  # done: every trial finished, or the job SUCCEEDED
EXIT_FAILED = 1  # ran, but some trials failed (or were stopped), or the cluster job FAILED or was STOPPED
EXIT_BAD_INPUT = 2  # refused before anything started: the message names the field and the value
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), the shell's convention: unfinished trials KILLED, resumable
EXIT_TERMINATED = 143  # SIGTERM (eviction, `ray job stop`, `kill`): handled as Ctrl-C, 128 + 15
