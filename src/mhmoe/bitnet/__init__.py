"""BitNet b1.58 (paper Table 3): quantised layers, the module converter, packed ternary exports."""
