/* Everything is in include/cledger.h; this file makes the target a C library. */
#include "cledger.h"
