// The expert distribution recorder (DESIGN section 3; reference/recorder.md): counts, per MoE
// layer and per forward pass, how many (token, routed slot) pairs went to each physical expert
// slot, keeps a bounded window of passes, reports balancedness, and converts to logical counts
// for the EPLB planner.
//
// Fixes over SGLang's recorder (reference/recorder.md sections 9 and 15): a hook outside a layer
// or forward-pass scope, nested scopes, a layer out of range and an id >= P are clear errors that
// count nothing anywhere (never a broadcast into every layer or a count on layer 0); only routed
// ids are ever counted; every mode is bounded by buffer_size; passes are returned in time order and
// each is converted with the placement that was current when it was recorded.
#pragma once

#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "moelb/balancedness.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb {

// kStat: one [L, P] count per pass. kPerPass: the same, with the pass id (SGLang's per_pass
// records). kPerToken: also the routed ids of every token, per layer.
enum class RecorderMode { kStat, kPerPass, kPerToken };

RecorderMode parse_recorder_mode(std::string_view name, std::string_view param = "mode");
std::string_view to_string(RecorderMode mode);

class ExpertDistributionRecorder {
  public:
    // One recorded forward pass.
    struct Pass {
        std::int64_t forward_pass_id = 0;
        std::shared_ptr<const ExpertLocation> location;  // the placement when it was recorded
        std::vector<std::int32_t> counts;                // [L, P]
        double balancedness = 0.0;  // pass_balancedness (SGLang's: idle layers count 1.0)
        // kPerToken: per layer, the routed ids offered to on_select_experts, flattened
        // [tokens, top_k] (appended call after call), and top_k (0 = no call).
        std::vector<std::vector<std::int32_t>> token_ids;
        std::vector<int> token_top_k;
    };

    // location: the placement whose physical ids the hooks receive (L, P, ep_size, and the map
    // used to convert to logical counts). buffer_size: passes kept (oldest dropped first);
    // negative = unbounded. ep_rank: this process's EP rank (recorded in dumps).
    ExpertDistributionRecorder(ExpertLocation location, RecorderMode mode = RecorderMode::kStat,
                               Index buffer_size = 1000, int ep_rank = 0);

    RecorderMode mode() const { return mode_; }
    Index buffer_size() const { return buffer_size_; }
    int ep_rank() const { return ep_rank_; }
    int num_layers() const;
    int num_physical_experts() const;
    std::shared_ptr<const ExpertLocation> location() const;
    // Later passes are recorded (and converted) with this placement; same L, E, P and ep_size.
    void set_location(ExpertLocation location);

    // start(): clears what was accumulated and starts recording. stop(): stops recording and
    // keeps the data. Neither may be called inside a layer scope.
    void start();
    void stop();
    bool recording() const;

    // Scopes. A pass id defaults to one more than the last one begun; an explicit id must not be
    // lower than that (ids grow, so dumps of several ranks merge by id). Nesting a scope of the
    // same kind, or ending one that is not open, is an InvalidArgument. Ending a pass while
    // recording appends it to the window.
    void begin_forward_pass(std::optional<std::int64_t> forward_pass_id = std::nullopt);
    void end_forward_pass();
    void begin_layer(int layer);
    void end_layer();
    std::optional<int> current_layer() const;

    // RAII scopes for C++ callers.
    class ForwardPassScope {
      public:
        explicit ForwardPassScope(ExpertDistributionRecorder& r,
                                  std::optional<std::int64_t> id = std::nullopt)
            : r_(&r), exceptions_(std::uncaught_exceptions()) {
            r.begin_forward_pass(id);
        }
        // Ends the pass, or drops it when the scope's own body is unwinding an exception.
        ~ForwardPassScope() noexcept(false) {
            if (std::uncaught_exceptions() == exceptions_)
                r_->end_forward_pass();
            else
                r_->abandon_forward_pass();
        }
        ForwardPassScope(const ForwardPassScope&) = delete;
        ForwardPassScope& operator=(const ForwardPassScope&) = delete;

      private:
        ExpertDistributionRecorder* r_;
        int exceptions_;
    };
    class LayerScope {
      public:
        LayerScope(ExpertDistributionRecorder& r, int layer) : r_(&r) { r.begin_layer(layer); }
        ~LayerScope() noexcept(false) { r_->end_layer(); }
        LayerScope(const LayerScope&) = delete;
        LayerScope& operator=(const LayerScope&) = delete;

      private:
        ExpertDistributionRecorder* r_;
    };

    // Hooks. Both need an open forward pass and layer scope and validate all input before
    // counting anything; they count only while recording.
    // topk_ids [T, K]: physical routed ids in [0, P), or -1 (ignored). expected_layer: if set,
    // must equal the current layer (a guard against counting on the wrong layer).
    void on_select_experts(ConstMatrixMap<std::int32_t> topk_ids,
                           std::optional<int> expected_layer = std::nullopt);
    // Refuses (InvalidArgument naming `location`) routed ids that are not slots of this
    // recorder's current placement, before a router hands them to on_select_experts: with a
    // `location` (ids mapped to its slots), it must equal the recorder's placement (same map,
    // E, ep_size and num_nodes: ExpertLocation::operator==); without one (nullptr: the ids are
    // logical ids of `num_experts` experts), the recorder's placement must be the identity
    // (P == E == num_experts, slot p holds expert p in every layer, as for a recorder built from
    // a shape (L, P)). O(L * P) with a location, O(1) without.
    void check_id_space(const ExpertLocation* location, int num_experts) const;
    // local_counts [S + num_trailing_shared_slots]: tokens rank `ep_rank` received per local slot
    // (the DeepEP low-latency path); the trailing shared slots are dropped.
    void on_dispatch_counts(std::span<const std::int64_t> local_counts, int ep_rank,
                            int num_trailing_shared_slots = 0);

    // The recorded passes, oldest first (a copy taken under the lock).
    std::vector<Pass> passes() const;
    // One recorded pass (a copy): index in [-num_passes, num_passes), negative from the newest.
    Pass pass_at(Index index) const;
    Index num_passes() const;
    // [T, L, P] physical counts and [T] forward-pass ids of the window, oldest first, copied
    // under the lock without copying the passes (passes() also copies per-token ids).
    std::vector<std::int32_t> physical_count() const;
    std::vector<std::int64_t> forward_pass_ids() const;
    // Passes of the window recorded with a placement other than the current one (set_location
    // since they were recorded).
    Index num_passes_with_other_placement() const;
    // [T, L, E] logical counts, each pass converted with its own placement.
    std::vector<std::int32_t> logical_count() const;
    // Mean balancedness (SGLang's, pass_balancedness) over the last `window` passes, idle passes
    // included (they count 1.0, as in SGLang); NaN when no pass was recorded since start(). The
    // history keeps the last 1000 passes regardless of buffer_size. window = 1000 is SGLang's
    // average_utilization_rate_over_window.
    double average_balancedness(int window) const;
    // Clears the recorded passes (recording state unchanged). The balancedness history is a
    // rolling monitor of the last 1000 passes and survives clear() (and so dump()); start()
    // clears both.
    void clear();
    // Adds `other`'s counts (recorded on another rank) pass by pass: both must hold the same
    // number of passes of the same L, P, mode and placements. Per-token ids are appended.
    void merge(const ExpertDistributionRecorder& other);

    // The window's per-token ids packed into one int32 buffer, for a collective (the other ranks
    // pass it to merge_summed_counts). Layout, passes oldest first and layers in order (index
    // t * L + l): top_k[T * L], num_ids[T * L] (ids of that pass and layer, tokens * top_k), then
    // the ids themselves. Empty headers (all zero) outside kPerToken mode.
    std::vector<std::int32_t> packed_token_ids() const;
    // The native half of a distributed merge: `summed` [T, L, P] holds, pass by pass, the counts
    // of every rank of the group summed (an all_reduce of physical counts; this recorder's own
    // included), and `others` the packed_token_ids() of the other ranks in the order their ids
    // are appended (kPerToken; empty otherwise). Afterwards each pass holds the summed counts and
    // balancedness, exactly as merge() of recorders holding the other ranks' passes would leave
    // it. Every pass of the window must have been recorded with the current placement. Validates
    // everything (shape, summed >= this recorder's counts, int32 range, packs, top_k) before
    // changing anything.
    void merge_summed_counts(std::span<const std::int32_t> summed,
                             const std::vector<std::span<const std::int32_t>>& others = {});
    void merge_summed_counts(std::span<const std::int64_t> summed,
                             const std::vector<std::span<const std::int32_t>>& others = {});

    // For ForwardPassScope when the body threw: closes the pass without appending it.
    void abandon_forward_pass();

  private:
    void check_in_layer(const char* hook) const;
    void append_pass_locked();
    template <class Count>
    void merge_summed_counts_impl(std::span<const Count> summed,
                                  const std::vector<std::span<const std::int32_t>>& others);
    void refresh_merged_balancedness_locked();

    mutable std::mutex mutex_;
    RecorderMode mode_;
    Index buffer_size_;
    int ep_rank_;
    std::shared_ptr<const ExpertLocation> location_;
    bool identity_ = false;  // location_ maps slot p to expert p in every layer, P == E
    bool recording_ = false;
    bool in_pass_ = false;
    std::int64_t next_pass_id_ = 0;
    std::optional<int> layer_;
    Pass current_;
    std::deque<Pass> passes_;
    std::deque<double> history_;  // balancedness of the last kHistory passes
};

}  // namespace moelb
