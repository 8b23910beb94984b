import sys

from examples.cartpole.cartpole import main

sys.exit(main())
