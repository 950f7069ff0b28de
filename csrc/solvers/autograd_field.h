// Moved to csrc/fields/autograd_field.h; this forwarding header keeps older includes compiling.
#pragma once
#include "fields/autograd_field.h"
