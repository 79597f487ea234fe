"""
The command line's one error pattern, shared by every script here.

Bad input never ends in a traceback: a wrong flag or an unreadable file prints one line that
names what is wrong, and the command exits with status 2.

    $ python tasks.py make --task chess
    tasks.py make: error: argument --task: invalid choice: 'chess' (choose from countdown, sudoku)
    $ python train.py --stage rl --run-dir /nowhere
    train.py: error: no SFT checkpoint at /nowhere/sft.pt: run `python train.py --stage sft` ...

Flags are checked by ArgumentParser (argparse's, whose error() prints one line instead of the
whole usage); everything found wrong later is raised as an exception, caught once in the
script's main(), and turned into that line by fail().
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line: `prog: error: message`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog, error):
    """Print `prog: error: <error>` on stderr and return the exit status 2 for main() to return."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
