"""Entry point of `python -m difa.evaluate`; see difa/cli/evaluate.py."""

from difa.cli.evaluate import main

if __name__ == "__main__":
    main()
