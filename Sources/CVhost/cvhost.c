// CVhost is header-only; this file exists so SwiftPM builds the target.
#include "cvhost.h"
