"""The kpi service.

OpenBLAS is limited to one thread before numpy or scipy first load it (``setdefault``: an
operator's explicit setting wins). The CLV fits are L-BFGS-B over 3-4 parameters: BLAS threads
buy nothing there, and their spin-waiting between the optimiser's calls took the other core
from everything else in the process (the consumer loop, SQLite's thread); on the busy 2-core
development machine a 25k-customer fit took 4.4-5.2 s with them and 1.3 s without.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
