"""The thin host side of Forge: detect hardware, plan, launch the runner image, render its events.

Never imports torch or transformers (a test enforces it), so `forge` starts fast on any laptop.
"""
