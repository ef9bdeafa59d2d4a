import time

import grnn_fault_plugin

if grnn_fault_plugin.SLOW_IMPORT:
    end = time.monotonic() + 40
    while time.monotonic() < end:  # Python bytecode: the trial's watchdog can interrupt it here
        pass
