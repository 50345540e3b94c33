"""SELF-ALIGN (principle-driven self-alignment, the method behind Dromedary) as a package.

The stages live in `selfalign.stages`; shared pieces (models, generation, records) one module each.
"""

__version__ = "0.1.0"
