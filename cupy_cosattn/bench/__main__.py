"""python -m cupy_cosattn.bench"""
import sys

from .cli import main

sys.exit(main())
