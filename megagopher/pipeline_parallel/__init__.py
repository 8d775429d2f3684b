"""Pipeline parallelism: stages (stages.py), point-to-point communication (p2p.py), schedules as plans
(plan.py) run by schedules.py, and schedule traces (trace.py). ZB-H1's deferred weight-gradient store
belongs to the layers that own the linears (tensor_parallel/weight_grad.py); the schedule only switches
deferral on and runs the W passes.

Import the submodules directly: stages.py imports the model, which imports tensor_parallel, and this
file keeps importing the package cheap for the pure modules (plan.py, trace.py).
"""
