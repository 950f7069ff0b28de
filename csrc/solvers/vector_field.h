// Moved to csrc/fields/vector_field.h; this forwarding header keeps older includes compiling.
#pragma once
#include "fields/vector_field.h"
