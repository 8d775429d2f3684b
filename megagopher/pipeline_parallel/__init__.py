"""Pipeline parallelism: stages (stages.py), point-to-point communication (p2p.py), schedules as plans
(plan.py) run by schedules.py, the ZB-H1 weight-gradient split (weight_grad.py) and schedule traces
(trace.py).

Import the submodules directly. This file imports nothing on purpose: tensor_parallel/layers.py imports
``weight_grad`` from here, and stages.py imports the model, which imports tensor_parallel.
"""
