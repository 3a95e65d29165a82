import os
import sys
import warnings

# Tests import the package from the checkout and the `harness` helper beside them.
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")
