"""rlrf4rec: Reinforcement Learning from Recsys Feedback for LLM-enhanced re-ranking (RLRF4Rec / DPO4Rec).

The stages, in order, are listed in rlrf4rec.pipeline. Importing the package loads no heavy framework.
"""

__version__ = "0.1.0"
