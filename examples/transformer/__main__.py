import sys

from examples.transformer.transformer import main

sys.exit(main())
