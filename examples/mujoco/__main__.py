import sys

from examples.mujoco.mujoco import main

sys.exit(main())
