/* SPDX-License-Identifier: Apache-2.0 */
/*
 * metrics.h - count every packet the programs decide on, per reason and
 * direction (cilium_metrics; reason 0 = forwarded, else the drop reason).
 * Per-CPU values: no atomics on the hot path; readers sum the CPUs.
 */
#ifndef __PROPOLIS_METRICS_H_
#define __PROPOLIS_METRICS_H_

#include "lib/maps.h"

#define REASON_FORWARDED 0

static __always_inline void update_metrics(__u32 bytes, __u8 dir, __u8 reason)
{
	struct metrics_key key = {};
	struct metrics_value zero = {};
	struct metrics_value *value;

	key.reason = reason;
	key.dir = dir;
	value = cilium_metrics.lookup_or_try_init(&key, &zero);
	if (value) {
		value->count += 1;
		value->bytes += bytes;
	}
}

#endif /* __PROPOLIS_METRICS_H_ */
