// kvslim umbrella header: compressed KV caches for transformer inference.
#pragma once

#include "kvslim/cache/config.h"
#include "kvslim/cache/kv_cache.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/cpu/isa.h"
#include "kvslim/error.h"
#include "kvslim/policy/codebook.h"
#include "kvslim/policy/nuq.h"
#include "kvslim/policy/policy.h"
#include "kvslim/policy/retrieval.h"
#include "kvslim/policy/rotation.h"
#include "kvslim/tensor/dtype.h"
#include "kvslim/tensor/tensor.h"
#include "kvslim/version.h"
