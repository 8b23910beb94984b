import sys

from examples.finetune.finetune import main

sys.exit(main())
