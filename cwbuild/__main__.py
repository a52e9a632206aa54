"""`python -m cwbuild`."""

from cwbuild.cli import main

if __name__ == "__main__":
    main()
