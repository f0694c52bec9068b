"""``python -m twistlm``: the same command-line interface as the ``twistlm`` script."""

from twistlm.cli import main

if __name__ == "__main__":
    main()
