// The same kernel compiled for AVX512 (flags in setup.py); loaded only where torch reports that
// CPU capability (ascendspeed/model/fused.py).
#include "alibi_attention.cpp"
