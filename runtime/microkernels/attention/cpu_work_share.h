// How the CPU kernels split their items between IREE workgroups (fwd_cpu.c, bwd_cpu.c).
//
// Items are (head, block) pairs, head-major, so consecutive items share K and V (or Q and dO) in
// cache. Workgroup `wg` of `wg_count` takes the items whose cost midpoint falls in the wg-th of
// wg_count equal parts of the total cost: IREE's task system hands out tiles of a large grid eight at
// a time, which on a small machine leaves one worker a whole reservation behind, and causal items
// differ in cost anyway.
#ifndef FLASHMLIR_CPU_WORK_SHARE_H_
#define FLASHMLIR_CPU_WORK_SHARE_H_

// Run CALL (which sees `h` and `b`) for this workgroup's items; COST is item (h, b)'s cost and may
// only depend on b. Expects `wg` and `wg_count` in scope; returns from the enclosing function.
#define FLASHMLIR_SHARE(COST, BLOCKS, HEADS, CALL)                                          \
  do {                                                                                      \
    size_t head_cost = 0;                                                                   \
    for (size_t b = 0; b < (BLOCKS); ++b) head_cost += (COST);                              \
    const size_t total = head_cost * (HEADS);                                               \
    size_t prefix = 0;                                                                      \
    for (size_t h = 0; h < (HEADS); ++h) {                                                  \
      if ((prefix + head_cost) * wg_count < wg * total) { /* all of this head is before ours */ \
        prefix += head_cost;                                                                \
        continue;                                                                           \
      }                                                                                     \
      for (size_t b = 0; b < (BLOCKS); ++b) {                                               \
        const size_t cost = (COST);                                                         \
        const size_t owner = (2 * prefix + cost) * wg_count / (2 * total);                  \
        if (owner > wg) return;                                                             \
        if (owner == wg) CALL;                                                              \
        prefix += cost;                                                                     \
      }                                                                                     \
    }                                                                                       \
  } while (0)

#endif  // FLASHMLIR_CPU_WORK_SHARE_H_
