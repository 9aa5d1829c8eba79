import sys

from shared.demo.sender import main

raise SystemExit(main(sys.argv[1:]))
