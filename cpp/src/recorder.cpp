// The expert distribution recorder (DESIGN section 3; moelb/recorder.hpp): per-pass counts per
// layer and slot in a bounded window, merges across ranks, logical counts for the planner.
#include "moelb/recorder.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>

#include "enum_names.hpp"
#include "moelb/errors.hpp"

namespace moelb {
namespace {

constexpr std::size_t kHistory = 1000;  // balancedness passes kept (the largest window)

// Slot p holds expert p in every layer and P == E: logical ids are slots.
bool is_identity(const ExpertLocation& location) {
    if (location.num_physical_experts() != location.num_logical_experts()) return false;
    const auto& map = location.physical_to_logical();
    for (Index l = 0; l < map.rows(); ++l) {
        for (Index p = 0; p < map.cols(); ++p) {
            if (map(l, p) != p) return false;
        }
    }
    return true;
}

std::string describe(const ExpertLocation& location) {
    std::ostringstream out;
    out << "[" << location.num_layers() << " layers, " << location.num_physical_experts()
        << " slots] of " << location.num_logical_experts()
        << " experts, ep_size=" << location.ep_size() << ", num_nodes=" << location.num_nodes();
    return out.str();
}

using Pass = ExpertDistributionRecorder::Pass;

// summed [T, L, P]: every pass recorded with the current placement, and each sum at least this
// recorder's count and within int32.
template <class Count>
void check_summed_counts(std::span<const Count> summed, const std::deque<Pass>& passes,
                         const std::shared_ptr<const ExpertLocation>& location, std::size_t L,
                         std::size_t P) {
    constexpr std::int64_t kMax = std::numeric_limits<std::int32_t>::max();
    for (std::size_t t = 0; t < passes.size(); ++t) {
        const Pass& pass = passes[t];
        MOELB_CHECK_ARG(pass.location == location || *pass.location == *location,
                        "pass " << t << " (forward_pass_id=" << pass.forward_pass_id
                                << ") was recorded with different placements than the "
                                   "recorder's current one");
        const Count* sum = summed.data() + t * L * P;
        // A branch-free scan first (vectorised); the error path below names the first bad entry.
        bool bad = false;
        for (std::size_t i = 0; i < L * P; ++i) {
            const auto v = static_cast<std::int64_t>(sum[i]);
            bad |= (v < pass.counts[i]) | (v > kMax);
        }
        if (!bad) continue;
        for (std::size_t i = 0; i < L * P; ++i) {
            MOELB_CHECK_ARG(static_cast<std::int64_t>(sum[i]) >= pass.counts[i] &&
                                static_cast<std::int64_t>(sum[i]) <= kMax,
                            "summed[" << t << ", " << i / P << ", " << i % P << "] = " << sum[i]
                                      << " is not a sum that includes this recorder's count "
                                      << pass.counts[i] << " and fits in int32");
        }
    }
}

// Other ranks' packed_token_ids(): a header of top_k and id counts per (pass, layer) cell that
// agrees with this recorder's top_k and the other packs', then ids in [-1, P).
void check_packed_token_ids(const std::vector<std::span<const std::int32_t>>& others,
                            const std::deque<Pass>& passes, std::size_t L, std::size_t P) {
    const std::size_t cells = passes.size() * L;
    for (std::size_t r = 0; r < others.size(); ++r) {
        const auto& pack = others[r];
        MOELB_CHECK_ARG(pack.size() >= 2 * cells, "others[" << r << "] holds " << pack.size()
                                                            << " values, fewer than its "
                                                            << 2 * cells << " header entries");
        std::size_t total = 2 * cells;
        for (std::size_t c = 0; c < cells; ++c) {
            const std::int32_t k = pack[c], n = pack[cells + c];
            const int mine = passes[c / L].token_top_k[c % L];
            MOELB_CHECK_ARG(k >= 0 && n >= 0 && (k == 0 ? n == 0 : n % k == 0),
                            "others[" << r << "]: layer " << c % L << " of pass " << c / L
                                      << " has " << n << " ids for top_k=" << k);
            MOELB_CHECK_ARG(k == 0 || mine == 0 || k == mine,
                            "layer " << c % L << " of pass " << c / L << " has top_k " << mine
                                     << " here and " << k << " in others[" << r << "]");
            total += static_cast<std::size_t>(n);
        }
        MOELB_CHECK_ARG(pack.size() == total, "others[" << r << "] holds " << pack.size()
                                                        << " values but its header describes "
                                                        << total);
        for (std::size_t i = 2 * cells; i < total; ++i) {
            MOELB_CHECK_ARG(pack[i] >= -1 && static_cast<std::size_t>(pack[i] + 1) <= P,
                            "others[" << r << "] holds the id " << pack[i]
                                      << ", outside [-1, num_physical_experts=" << P << ")");
        }
        // Layers that two other ranks fill must agree on top_k too.
        for (std::size_t q = 0; q < r; ++q) {
            for (std::size_t c = 0; c < cells; ++c) {
                const std::int32_t a = others[q][c], b = pack[c];
                MOELB_CHECK_ARG(a == 0 || b == 0 || a == b,
                                "layer " << c % L << " of pass " << c / L << " has top_k " << a
                                         << " in others[" << q << "] and " << b << " in others["
                                         << r << "]");
            }
        }
    }
}

// Appends each pack's ids of a (pass, layer) cell to that cell's ids, in rank order.
void append_packed_token_ids(const std::vector<std::span<const std::int32_t>>& others,
                             std::deque<Pass>& passes, std::size_t L) {
    const std::size_t cells = passes.size() * L;
    for (const auto& pack : others) {
        std::size_t next = 2 * cells;
        for (std::size_t c = 0; c < cells; ++c) {
            const std::int32_t k = pack[c];
            const auto n = static_cast<std::size_t>(pack[cells + c]);
            Pass& pass = passes[c / L];
            if (k != 0) {
                auto& ids = pass.token_ids[c % L];
                ids.insert(ids.end(), pack.begin() + static_cast<std::ptrdiff_t>(next),
                           pack.begin() + static_cast<std::ptrdiff_t>(next + n));
                pass.token_top_k[c % L] = k;
            }
            next += n;
        }
    }
}

}  // namespace

constexpr detail::EnumNames<RecorderMode, 3> kRecorderModeNames{{
    {"stat", RecorderMode::kStat},
    {"per_pass", RecorderMode::kPerPass},
    {"per_token", RecorderMode::kPerToken},
}};

RecorderMode parse_recorder_mode(std::string_view name, std::string_view param) {
    return detail::parse_enum(kRecorderModeNames, name, param, "a recorder mode");
}

std::string_view to_string(RecorderMode value) {
    return detail::enum_name(kRecorderModeNames, value);
}

ExpertDistributionRecorder::ExpertDistributionRecorder(ExpertLocation location, RecorderMode mode,
                                                       Index buffer_size, int ep_rank)
    : mode_(mode),
      buffer_size_(buffer_size),
      ep_rank_(ep_rank),
      location_(std::make_shared<const ExpertLocation>(std::move(location))),
      identity_(is_identity(*location_)) {
    MOELB_CHECK_ARG(buffer_size != 0,
                    "buffer_size must be positive (passes kept) or negative (unbounded), got 0");
    MOELB_CHECK_ARG(
        ep_rank >= 0 && ep_rank < location_->ep_size(),
        "ep_rank=" << ep_rank << " is outside [0, ep_size=" << location_->ep_size() << ")");
}

int ExpertDistributionRecorder::num_layers() const { return location()->num_layers(); }

int ExpertDistributionRecorder::num_physical_experts() const {
    return location()->num_physical_experts();
}

std::shared_ptr<const ExpertLocation> ExpertDistributionRecorder::location() const {
    std::lock_guard lock(mutex_);
    return location_;
}

void ExpertDistributionRecorder::set_location(ExpertLocation location) {
    std::lock_guard lock(mutex_);
    // A pass is converted to logical ids with one placement: slots counted after a switch inside
    // the pass would be read with the old one.
    MOELB_CHECK_ARG(!in_pass_,
                    "set_location inside a forward pass: the pass's counts would be converted "
                    "with one placement although its layers used two; switch placements between "
                    "passes");
    MOELB_CHECK_ARG(
        location.num_layers() == location_->num_layers() &&
            location.num_logical_experts() == location_->num_logical_experts() &&
            location.num_physical_experts() == location_->num_physical_experts() &&
            location.ep_size() == location_->ep_size(),
        "the new location has num_layers="
            << location.num_layers() << ", num_logical_experts=" << location.num_logical_experts()
            << ", num_physical_experts=" << location.num_physical_experts()
            << ", ep_size=" << location.ep_size() << " but the recorder has "
            << location_->num_layers() << ", " << location_->num_logical_experts() << ", "
            << location_->num_physical_experts() << ", " << location_->ep_size());
    location_ = std::make_shared<const ExpertLocation>(std::move(location));
    identity_ = is_identity(*location_);
}

void ExpertDistributionRecorder::check_id_space(const ExpertLocation* location,
                                                int num_experts) const {
    std::lock_guard lock(mutex_);
    if (location == nullptr) {
        MOELB_CHECK_ARG(
            identity_ && num_experts == location_->num_logical_experts(),
            "location=None: the routed ids are logical ids of "
                << num_experts << " experts, but the recorder counts the slots of a placement "
                << describe(*location_)
                << (identity_ ? " (a different number of experts)"
                              : " where slot p does not hold expert p")
                << "; pass location= (the recorder's placement, recorder.location) and layer=");
        return;
    }
    MOELB_CHECK_ARG(*location == *location_,
                    "location is the placement "
                        << describe(*location) << " but the recorder counts the slots of another "
                        << "placement " << describe(*location_)
                        << ": its ids would be counted as other experts; route with the "
                           "recorder's placement (recorder.location), or call "
                           "recorder.set_location(location) when the placement changes");
}

void ExpertDistributionRecorder::start() {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(!layer_, "start() inside the layer(" << *layer_ << ") scope");
    passes_.clear();
    history_.clear();
    recording_ = true;
}

void ExpertDistributionRecorder::stop() {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(!layer_, "stop() inside the layer(" << *layer_ << ") scope");
    recording_ = false;
}

bool ExpertDistributionRecorder::recording() const {
    std::lock_guard lock(mutex_);
    return recording_;
}

void ExpertDistributionRecorder::begin_forward_pass(std::optional<std::int64_t> forward_pass_id) {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(!in_pass_, "forward_pass() scopes cannot be nested (pass "
                                   << current_.forward_pass_id << " is still open)");
    MOELB_CHECK_ARG(!forward_pass_id || *forward_pass_id < std::numeric_limits<std::int64_t>::max(),
                    "forward_pass_id=" << *forward_pass_id << " is too large");
    MOELB_CHECK_ARG(!forward_pass_id || *forward_pass_id >= next_pass_id_,
                    "forward_pass_id=" << *forward_pass_id << " does not increase (the next id is "
                                       << next_pass_id_
                                       << "); pass ids must grow so dumps can be merged by id");
    const int L = location_->num_layers();
    const int P = location_->num_physical_experts();
    current_.forward_pass_id = forward_pass_id.value_or(next_pass_id_);
    next_pass_id_ = current_.forward_pass_id + 1;
    current_.location = location_;
    current_.counts.assign(static_cast<std::size_t>(L) * P, 0);
    current_.balancedness = 0.0;
    current_.token_ids.assign(mode_ == RecorderMode::kPerToken ? L : 0, {});
    current_.token_top_k.assign(mode_ == RecorderMode::kPerToken ? L : 0, 0);
    in_pass_ = true;
}

void ExpertDistributionRecorder::append_pass_locked() {
    current_.balancedness =
        pass_balancedness(current_.counts, location_->num_layers(),
                          location_->num_physical_experts(), location_->ep_size());
    history_.push_back(current_.balancedness);
    if (history_.size() > kHistory) history_.pop_front();
    passes_.push_back(std::move(current_));
    if (buffer_size_ > 0 && static_cast<Index>(passes_.size()) > buffer_size_) {
        passes_.pop_front();
    }
    current_ = Pass{};
}

void ExpertDistributionRecorder::end_forward_pass() {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(in_pass_, "end of a forward_pass() scope that is not open");
    MOELB_CHECK_ARG(!layer_, "the forward pass ends inside the layer(" << *layer_ << ") scope");
    in_pass_ = false;
    if (recording_) append_pass_locked();
}

void ExpertDistributionRecorder::abandon_forward_pass() {
    std::lock_guard lock(mutex_);
    in_pass_ = false;
    layer_.reset();
    current_ = Pass{};
}

void ExpertDistributionRecorder::begin_layer(int layer) {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(in_pass_, "layer(" << layer << ") outside a forward_pass() scope");
    MOELB_CHECK_ARG(!layer_, "layer() scopes cannot be nested (layer("
                                 << *layer_ << ") is open, layer(" << layer << ") was asked)");
    MOELB_CHECK_ARG(
        layer >= 0 && layer < location_->num_layers(),
        "layer=" << layer << " is outside [0, num_layers=" << location_->num_layers() << ")");
    layer_ = layer;
}

void ExpertDistributionRecorder::end_layer() {
    std::lock_guard lock(mutex_);
    MOELB_CHECK_ARG(layer_, "end of a layer() scope that is not open");
    layer_.reset();
}

std::optional<int> ExpertDistributionRecorder::current_layer() const {
    std::lock_guard lock(mutex_);
    return layer_;
}

void ExpertDistributionRecorder::check_in_layer(const char* hook) const {
    MOELB_CHECK_ARG(in_pass_, hook << " called outside a forward_pass() scope");
    MOELB_CHECK_ARG(layer_, hook << " called outside a layer() scope: the counts would have no "
                                    "layer (wrap each MoE layer in recorder.layer(i))");
}

void ExpertDistributionRecorder::on_select_experts(ConstMatrixMap<std::int32_t> topk_ids,
                                                   std::optional<int> expected_layer) {
    std::lock_guard lock(mutex_);
    check_in_layer("on_select_experts");
    MOELB_CHECK_ARG(!expected_layer || *expected_layer == *layer_,
                    "layer=" << *expected_layer << " but the recorder's current scope is layer("
                             << *layer_ << ")");
    const int P = location_->num_physical_experts();
    const Index T = topk_ids.rows(), K = topk_ids.cols();
    const std::int32_t* ids = topk_ids.data();
    // Validate everything first: a bad id counts nothing anywhere.
    for (Index i = 0; i < T * K; ++i) {
        MOELB_CHECK_ARG(ids[i] >= -1 && ids[i] < P,
                        "topk_ids[" << i / K << ", " << i % K << "] = " << ids[i]
                                    << " is outside [-1, num_physical_experts=" << P << ")");
    }
    if (mode_ == RecorderMode::kPerToken) {
        const int k = current_.token_top_k[static_cast<std::size_t>(*layer_)];
        MOELB_CHECK_ARG(k == 0 || k == K, "topk_ids has " << K << " columns but layer " << *layer_
                                                          << " was given " << k
                                                          << " earlier in this pass");
    }
    if (!recording_) return;
    std::int32_t* row = current_.counts.data() + static_cast<Index>(*layer_) * P;
    // An int32 slot count must not wrap: when this call could push the fullest slot past
    // INT32_MAX, count exactly what it adds per slot and refuse before changing anything.
    constexpr std::int64_t kMax = std::numeric_limits<std::int32_t>::max();
    const std::int64_t fullest = P > 0 ? *std::max_element(row, row + P) : 0;
    if (fullest + T * K > kMax) {
        std::vector<std::int64_t> added(static_cast<std::size_t>(P), 0);
        for (Index i = 0; i < T * K; ++i) {
            if (ids[i] >= 0) ++added[static_cast<std::size_t>(ids[i])];
        }
        for (int p = 0; p < P; ++p) {
            MOELB_CHECK_ARG(row[p] + added[static_cast<std::size_t>(p)] <= kMax,
                            "topk_ids adds " << added[static_cast<std::size_t>(p)] << " to slot "
                                             << p << ", which would overflow its "
                                             << "int32 count in this pass (" << row[p] << ")");
        }
    }
    for (Index i = 0; i < T * K; ++i) {
        if (ids[i] >= 0) ++row[ids[i]];
    }
    if (mode_ == RecorderMode::kPerToken && T > 0) {
        auto& tokens = current_.token_ids[static_cast<std::size_t>(*layer_)];
        tokens.insert(tokens.end(), ids, ids + T * K);
        current_.token_top_k[static_cast<std::size_t>(*layer_)] = static_cast<int>(K);
    }
}

void ExpertDistributionRecorder::on_dispatch_counts(std::span<const std::int64_t> local_counts,
                                                    int ep_rank, int num_trailing_shared_slots) {
    std::lock_guard lock(mutex_);
    check_in_layer("on_dispatch_counts");
    const int W = location_->ep_size();
    const int S = location_->num_local_physical_experts();
    const auto n = static_cast<Index>(local_counts.size());
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < W,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << W << ")");
    MOELB_CHECK_ARG(num_trailing_shared_slots >= 0 && num_trailing_shared_slots <= n,
                    "num_trailing_shared_slots=" << num_trailing_shared_slots
                                                 << " is outside [0, len(local_counts)=" << n
                                                 << "]");
    MOELB_CHECK_ARG(n - num_trailing_shared_slots == S,
                    "local_counts has " << n << " entries; expected " << S
                                        << " local slots + num_trailing_shared_slots="
                                        << num_trailing_shared_slots);
    for (int s = 0; s < S; ++s) {
        MOELB_CHECK_ARG(
            local_counts[s] >= 0 && local_counts[s] <= std::numeric_limits<std::int32_t>::max(),
            "local_counts[" << s << "] = " << local_counts[s] << " is not a token count");
    }
    if (!recording_) return;
    std::int32_t* row = current_.counts.data() +
                        static_cast<Index>(*layer_) * location_->num_physical_experts() +
                        static_cast<Index>(ep_rank) * S;
    for (int s = 0; s < S; ++s) {
        MOELB_CHECK_ARG(static_cast<std::int64_t>(row[s]) + local_counts[s] <=
                            std::numeric_limits<std::int32_t>::max(),
                        "local_counts[" << s << "] = " << local_counts[s]
                                        << " would overflow the int32 count of slot "
                                        << static_cast<Index>(ep_rank) * S + s << " in this pass");
    }
    for (int s = 0; s < S; ++s) row[s] += static_cast<std::int32_t>(local_counts[s]);
}

std::vector<ExpertDistributionRecorder::Pass> ExpertDistributionRecorder::passes() const {
    std::lock_guard lock(mutex_);
    return {passes_.begin(), passes_.end()};
}

ExpertDistributionRecorder::Pass ExpertDistributionRecorder::pass_at(Index index) const {
    std::lock_guard lock(mutex_);
    const auto n = static_cast<Index>(passes_.size());
    MOELB_CHECK_ARG(index >= -n && index < n,
                    "pass_index=" << index << " is outside [" << -n << ", " << n << ")");
    return passes_[static_cast<std::size_t>(index < 0 ? index + n : index)];
}

Index ExpertDistributionRecorder::num_passes() const {
    std::lock_guard lock(mutex_);
    return static_cast<Index>(passes_.size());
}

std::vector<std::int32_t> ExpertDistributionRecorder::physical_count() const {
    std::lock_guard lock(mutex_);
    const std::size_t cells = static_cast<std::size_t>(location_->num_layers()) *
                              static_cast<std::size_t>(location_->num_physical_experts());
    std::vector<std::int32_t> out;
    out.reserve(passes_.size() * cells);  // appended, not zeroed first
    for (const Pass& pass : passes_) out.insert(out.end(), pass.counts.begin(), pass.counts.end());
    return out;
}

std::vector<std::int64_t> ExpertDistributionRecorder::forward_pass_ids() const {
    std::lock_guard lock(mutex_);
    std::vector<std::int64_t> out;
    out.reserve(passes_.size());
    for (const Pass& pass : passes_) out.push_back(pass.forward_pass_id);
    return out;
}

Index ExpertDistributionRecorder::num_passes_with_other_placement() const {
    std::lock_guard lock(mutex_);
    Index n = 0;
    for (const Pass& pass : passes_) {
        if (pass.location != location_ && !(*pass.location == *location_)) ++n;
    }
    return n;
}

std::vector<std::int32_t> ExpertDistributionRecorder::logical_count() const {
    std::lock_guard lock(mutex_);
    const int L = location_->num_layers();
    const int E = location_->num_logical_experts();
    const int P = location_->num_physical_experts();
    std::vector<std::int64_t> wide(passes_.size() * static_cast<std::size_t>(L) * E, 0);
    std::size_t t = 0;
    for (const Pass& pass : passes_) {
        const auto& map = pass.location->physical_to_logical();
        std::int64_t* dst = wide.data() + t * static_cast<std::size_t>(L) * E;
        for (int l = 0; l < L; ++l) {
            for (int p = 0; p < P; ++p) {
                dst[static_cast<Index>(l) * E + map(l, p)] +=
                    pass.counts[static_cast<std::size_t>(l) * P + p];
            }
        }
        ++t;
    }
    std::vector<std::int32_t> out(wide.size());
    for (std::size_t i = 0; i < wide.size(); ++i) {
        MOELB_CHECK_ARG(wide[i] <= std::numeric_limits<std::int32_t>::max(),
                        "a logical count of " << wide[i] << " does not fit in int32");
        out[i] = static_cast<std::int32_t>(wide[i]);
    }
    return out;
}

double ExpertDistributionRecorder::average_balancedness(int window) const {
    MOELB_CHECK_ARG(window >= 1, "window must be positive, got " << window);
    std::lock_guard lock(mutex_);
    double sum = 0.0;
    int n = 0;
    const std::size_t first =
        history_.size() > static_cast<std::size_t>(window) ? history_.size() - window : 0;
    for (std::size_t i = first; i < history_.size(); ++i) {
        sum += history_[i];
        ++n;
    }
    return n == 0 ? std::numeric_limits<double>::quiet_NaN() : sum / n;
}

void ExpertDistributionRecorder::clear() {
    std::lock_guard lock(mutex_);
    passes_.clear();
}

void ExpertDistributionRecorder::merge(const ExpertDistributionRecorder& other) {
    MOELB_CHECK_ARG(&other != this, "a recorder cannot be merged with itself");
    std::scoped_lock lock(mutex_, other.mutex_);
    MOELB_CHECK_ARG(other.mode_ == mode_, "other has mode '" << to_string(other.mode_)
                                                             << "' but this recorder has '"
                                                             << to_string(mode_) << "'");
    MOELB_CHECK_ARG(other.passes_.size() == passes_.size(),
                    "other holds " << other.passes_.size() << " passes but this recorder holds "
                                   << passes_.size() << " (ranks must record in lockstep)");
    // Validate everything before changing anything.
    for (std::size_t t = 0; t < passes_.size(); ++t) {
        const Pass& mine = passes_[t];
        const Pass& theirs = other.passes_[t];
        MOELB_CHECK_ARG(*theirs.location == *mine.location,
                        "pass " << t
                                << " was recorded with different placements on the two "
                                   "recorders");
        for (std::size_t i = 0; i < mine.counts.size(); ++i) {
            MOELB_CHECK_ARG(static_cast<std::int64_t>(mine.counts[i]) + theirs.counts[i] <=
                                std::numeric_limits<std::int32_t>::max(),
                            "merging pass " << t << " would overflow an int32 count");
        }
        for (std::size_t l = 0; l < mine.token_top_k.size(); ++l) {
            const int a = mine.token_top_k[l], b = theirs.token_top_k[l];
            MOELB_CHECK_ARG(a == 0 || b == 0 || a == b,
                            "layer " << l << " of pass " << t << " has top_k " << a << " here and "
                                     << b << " in other");
        }
    }
    for (std::size_t t = 0; t < passes_.size(); ++t) {
        Pass& mine = passes_[t];
        const Pass& theirs = other.passes_[t];
        for (std::size_t i = 0; i < mine.counts.size(); ++i) mine.counts[i] += theirs.counts[i];
        for (std::size_t l = 0; l < mine.token_ids.size(); ++l) {
            if (theirs.token_top_k[l] == 0) continue;
            mine.token_top_k[l] = theirs.token_top_k[l];
            mine.token_ids[l].insert(mine.token_ids[l].end(), theirs.token_ids[l].begin(),
                                     theirs.token_ids[l].end());
        }
    }
    refresh_merged_balancedness_locked();
}

void ExpertDistributionRecorder::refresh_merged_balancedness_locked() {
    for (Pass& pass : passes_) {
        pass.balancedness =
            pass_balancedness(pass.counts, location_->num_layers(),
                              location_->num_physical_experts(), location_->ep_size());
    }
    // The merged passes' balancedness replaces this recorder's most recent history.
    const std::size_t n = std::min(history_.size(), passes_.size());
    for (std::size_t i = 0; i < n; ++i) {
        history_[history_.size() - n + i] = passes_[passes_.size() - n + i].balancedness;
    }
}

std::vector<std::int32_t> ExpertDistributionRecorder::packed_token_ids() const {
    std::lock_guard lock(mutex_);
    const std::size_t L = static_cast<std::size_t>(location_->num_layers());
    const std::size_t cells = passes_.size() * L;
    std::size_t total = 0;
    for (const Pass& pass : passes_) {
        for (const auto& ids : pass.token_ids) total += ids.size();
    }
    std::vector<std::int32_t> out(2 * cells + total, 0);
    std::size_t cell = 0, next = 2 * cells;
    for (const Pass& pass : passes_) {
        for (std::size_t l = 0; l < L; ++l, ++cell) {
            if (l >= pass.token_ids.size()) continue;
            const auto& ids = pass.token_ids[l];
            MOELB_CHECK_ARG(
                ids.size() <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
                "layer " << l << " of pass " << pass.forward_pass_id << " holds " << ids.size()
                         << " routed ids, too many to pack");
            out[cell] = pass.token_top_k[l];
            out[cells + cell] = static_cast<std::int32_t>(ids.size());
            std::copy(ids.begin(), ids.end(), out.begin() + static_cast<std::ptrdiff_t>(next));
            next += ids.size();
        }
    }
    return out;
}

void ExpertDistributionRecorder::merge_summed_counts(
    std::span<const std::int32_t> summed,
    const std::vector<std::span<const std::int32_t>>& others) {
    merge_summed_counts_impl(summed, others);
}

void ExpertDistributionRecorder::merge_summed_counts(
    std::span<const std::int64_t> summed,
    const std::vector<std::span<const std::int32_t>>& others) {
    merge_summed_counts_impl(summed, others);
}

template <class Count>
void ExpertDistributionRecorder::merge_summed_counts_impl(
    std::span<const Count> summed, const std::vector<std::span<const std::int32_t>>& others) {
    std::lock_guard lock(mutex_);
    const std::size_t L = static_cast<std::size_t>(location_->num_layers());
    const std::size_t P = static_cast<std::size_t>(location_->num_physical_experts());
    const std::size_t T = passes_.size();
    const std::size_t cells = T * L;
    MOELB_CHECK_ARG(summed.size() == cells * P,
                    "summed has " << summed.size() << " counts but the recorder holds " << T
                                  << " passes of [" << L << ", " << P << "] (" << cells * P << ")");
    MOELB_CHECK_ARG(others.empty() || mode_ == RecorderMode::kPerToken,
                    "token ids of other ranks need mode='per_token', the recorder has mode='"
                        << to_string(mode_) << "'");
    // Validate everything before changing anything.
    check_summed_counts(summed, passes_, location_, L, P);
    check_packed_token_ids(others, passes_, L, P);
    for (std::size_t t = 0; t < T; ++t) {
        Pass& pass = passes_[t];
        const Count* sum = summed.data() + t * L * P;
        for (std::size_t i = 0; i < L * P; ++i) pass.counts[i] = static_cast<std::int32_t>(sum[i]);
    }
    append_packed_token_ids(others, passes_, L);
    refresh_merged_balancedness_locked();
}

}  // namespace moelb
