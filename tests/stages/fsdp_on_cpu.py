"""Launch an align stage under FSDP on CPU processes (tests only):

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        tests/stages/fsdp_on_cpu.py align.sft RECIPE.yaml [key=value ...]

accelerate 1.15 turns an FSDP config into FSDP only for GPUs and other accelerators (AcceleratorState picks FSDP
in its MULTI_GPU/... branch); CPU processes fall back to plain data parallel over gloo. torch's FSDP2 itself shards
over gloo on CPU, so this patch makes accelerate's state FSDP (as it does for GPUs) and runs the stage unchanged:
align's gathering of sharded weights for checkpoints and the final model runs for real in CI.
"""

import faulthandler
import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

# A collective that one process never joins hangs the others: print every thread's stack and exit instead.
faulthandler.dump_traceback_later(int(os.environ.get("ALIGN_TEST_HANG_S", "300")), exit=True)

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPUs


AcceleratorState.__init__ = _init_fsdp_on_cpu
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
