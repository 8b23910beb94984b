import sys

from examples.digits.digits import main

sys.exit(main())
