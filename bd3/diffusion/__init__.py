"""Pure diffusion maths: schedules, block masks, t draws and corruption, SUBS and NELBO.

Functions here take and return tensors; they import nothing from the model, the training
loop or the CLI, so each is pinned by a sub-second CPU test.
"""
