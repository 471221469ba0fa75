"""``python -m medimgen ...`` (what torchrun's ``-m medimgen`` runs on every rank): the ``medimgen`` command."""

from medimgen.cli import main

if __name__ == "__main__":
    main()
