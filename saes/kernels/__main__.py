"""`python -m saes.kernels`: build the compiled CPU kernels and check them."""
from saes.kernels import main

main()
