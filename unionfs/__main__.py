"""`python -m unionfs`: the same as the `unionfs` command."""
from .launch import main

if __name__ == "__main__":
    main()
